"""sdlab: Stable Diffusion v1.x from scratch in PyTorch, one component per chapter.

```python
from sdlab import model_loader, pipeline
models = model_loader.preload_models_from_standard_weights("v1-5-pruned-emaonly.safetensors", "cpu")
image = pipeline.generate("a photograph of an astronaut riding a horse", models=models, seed=42)
```
"""

from .config import SD15, CLIPConfig, SDConfig, UNetConfig, VAEConfig

__version__ = "0.1.0"
__all__ = ["SD15", "CLIPConfig", "SDConfig", "UNetConfig", "VAEConfig"]
