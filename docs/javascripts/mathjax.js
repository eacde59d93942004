// MathJax settings for the formulas that pymdownx.arithmatex leaves in the pages.
// arithmatex (generic mode) wraps each formula in an element of class "arithmatex", delimited by
// \( \) inline and \[ \] for display; MathJax typesets those elements and nothing else.
window.MathJax = {
  tex: {
    inlineMath: [["\\(", "\\)"]],
    displayMath: [["\\[", "\\]"]],
    processEscapes: true,
    processEnvironments: true,
  },
  options: {
    ignoreHtmlClass: ".*",
    processHtmlClass: "arithmatex",
  },
};
