// Loaded between require.js and the widget manager (see nb_ipywidgets_js in _config.yml).
// The manager finds its fonts relative to its require.js module name; point that name at the
// copy vendored in _static, so that nothing is fetched from a CDN or from a missing path.
(function () {
  var here = document.currentScript.src.replace(/[^/]*$/, "");
  require.config({ paths: { "@jupyter-widgets/html-manager/dist": here + "vendor/html-manager" } });
})();

// The widgets typeset their labels with MathJax 2's `MathJax.Hub.Queue`; the book runs
// MathJax 3, which replaces the global `MathJax` object as it loads. Keep a small MathJax 2
// look-alike, forwarding to MathJax 3, on whatever object `window.MathJax` is.
(function () {
  var hub = {
    Queue: function () {
      for (var i = 0; i < arguments.length; i++) {
        var job = arguments[i];
        if (!Array.isArray(job) || job[0] !== "Typeset") continue;
        var element = job[2];
        var mj = window.MathJax;
        if (mj && mj.startup && mj.startup.promise) {
          mj.startup.promise.then(function () { return mj.typesetPromise(element ? [element] : undefined); });
        }
      }
    },
  };
  var current = window.MathJax;
  if (current && !current.Hub) current.Hub = hub;
  Object.defineProperty(window, "MathJax", {
    configurable: true,
    get: function () { return current; },
    set: function (value) {
      current = value;
      if (value && typeof value === "object" && !value.Hub) value.Hub = hub;
    },
  });
})();
