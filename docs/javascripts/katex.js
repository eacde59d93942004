// Typesets the formulas that pymdownx.arithmatex (generic mode) leaves in the pages.
//
// arithmatex wraps each formula in an element of class "arithmatex": a <span> holding \( ... \)
// for inline math, a <div> holding \[ ... \] for display math. This script hands the TeX inside
// each one to KaTeX, which is vendored into the site (javascripts/vendor/katex/, KaTeX 0.19.1 from
// the npm package `katex`, MIT licence beside it), so the pages need no network to show math.
// To update KaTeX: `npm pack katex`, then copy dist/katex.min.js, dist/katex.min.css,
// dist/fonts/*.woff2 and LICENSE over the files in vendor/katex/.
(function () {
  "use strict";

  var DELIMITERS = [
    ["\\(", "\\)", false],
    ["\\[", "\\]", true],
  ];

  function typeset(element) {
    var source = element.textContent.trim();
    for (var i = 0; i < DELIMITERS.length; i++) {
      var open = DELIMITERS[i][0], close = DELIMITERS[i][1], display = DELIMITERS[i][2];
      if (source.startsWith(open) && source.endsWith(close)) {
        var tex = source.slice(open.length, source.length - close.length);
        try {
          // Rendered into a fresh element first, so a formula KaTeX cannot parse keeps its
          // TeX on the page instead of being emptied.
          var target = document.createElement(display ? "div" : "span");
          katex.render(tex, target, { displayMode: display, throwOnError: true });
          element.replaceChildren.apply(element, Array.from(target.childNodes));
          element.classList.add("arithmatex--rendered");
        } catch (error) {
          console.error("KaTeX could not typeset " + source + ": " + error.message);
        }
        return;
      }
    }
  }

  function typesetAll() {
    document
      .querySelectorAll(".arithmatex:not(.arithmatex--rendered)")
      .forEach(typeset);
  }

  // With Material's instant navigation a page arrives without a reload: document$ then emits
  // once per page. Without it, typeset once the document is parsed.
  if (typeof window.document$ !== "undefined") {
    window.document$.subscribe(typesetAll);
  } else if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", typesetAll);
  } else {
    typesetAll();
  }
})();
