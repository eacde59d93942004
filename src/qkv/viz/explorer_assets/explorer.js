// qkv attention explorer: draws the weights embedded in #qkv-data (see qkv/viz/explorer.py).
// Safety rule for this file: text from the data (tokens, names, labels) is only ever assigned
// to textContent, title or option text; never to innerHTML.
(function () {
  "use strict";

  var DATA = JSON.parse(document.getElementById("qkv-data").textContent);
  var SVG_NS = document.getElementById("lines").namespaceURI;
  var ROW = 22; // px per token row; matches --row in the style sheet
  var LINES_WIDTH = 240; // px between the two token columns
  var MIN_LINE = 0.01; // weights below this draw no line (they would be invisible anyway)
  var MIN_LINE_F32 = Math.fround(MIN_LINE); // the weights are float32: compare like with like
  var TOP_K = 5; // how many of a row's weights the details panel lists per head
  var PALETTE = [
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b",
    "#e377c2", "#7f7f7f", "#bcbd22", "#17becf", "#393b79", "#ad494a"
  ];
  var HEAT = [[40, 11, 84], [188, 55, 84], [249, 142, 9], [252, 255, 164]]; // low to high

  var state = { view: 0, mode: "head", layer: 0, heads: [], focus: null, pinned: null, query: 0 };

  function $(id) { return document.getElementById(id); }

  function el(tag, className, text) {
    var node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function clear(node) { while (node.firstChild) node.removeChild(node.firstChild); }

  function headColour(h) {
    return h < PALETTE.length ? PALETTE[h] : "hsl(" + ((h * 137.5) % 360) + ", 60%, 45%)";
  }

  function rgbOf(colour) {
    var probe = document.createElement("canvas").getContext("2d");
    probe.fillStyle = colour;
    var hex = probe.fillStyle; // normalised to #rrggbb
    return [1, 3, 5].map(function (i) { return parseInt(hex.substr(i, 2), 16); });
  }

  function heat(t) {
    var x = Math.max(0, Math.min(1, t)) * (HEAT.length - 1);
    var i = Math.min(HEAT.length - 2, Math.floor(x));
    var f = x - i;
    return HEAT[i].map(function (c, j) { return Math.round(c + f * (HEAT[i + 1][j] - c)); });
  }

  function isSpecial(token) { return /^\[[A-Z]+\]$/.test(token) || /^<\/?s>$|^<pad>$/.test(token); }

  function fmt(w) { return w.toFixed(3); }

  // ----- data -----------------------------------------------------------------------------

  function view() { return DATA.views[state.view]; }

  function decode(v) {
    if (v.w) return v.w;
    var bin = atob(v.weights);
    var n = bin.length >> 1;
    var w = new Float32Array(n);
    for (var i = 0; i < n; i++) {
      w[i] = (bin.charCodeAt(2 * i) | (bin.charCodeAt(2 * i + 1) << 8)) / v.scale;
    }
    v.w = w;
    return w;
  }

  // Row q of (layer, head): the S weights query q gives to the keys.
  function row(v, l, h, q) {
    var H = v.shape[1], T = v.shape[2], S = v.shape[3];
    var start = ((l * H + h) * T + q) * S;
    return decode(v).subarray(start, start + S);
  }

  function weight(v, l, h, q, k) { return row(v, l, h, q)[k]; }

  function selectedHeads() {
    var out = [];
    state.heads.forEach(function (on, h) { if (on) out.push(h); });
    return out;
  }

  function patchOffset(v) { return v.grid ? v.shape[3] - v.grid[0] * v.grid[1] : 0; }

  // ----- controls ---------------------------------------------------------------------------

  function buildTabs() {
    var tabs = $("view-tabs");
    clear(tabs);
    DATA.views.forEach(function (v, i) {
      var b = el("button", "view-tab", v.name);
      b.type = "button";
      b.setAttribute("role", "tab");
      b.dataset.view = String(i);
      b.addEventListener("click", function () { selectView(i); });
      tabs.appendChild(b);
    });
    tabs.hidden = DATA.views.length < 2;
  }

  function buildControls() {
    var v = view();
    var layerSelect = $("layer-select");
    clear(layerSelect);
    v.layerLabels.forEach(function (label, l) {
      var o = el("option", "", label);
      o.value = String(l);
      layerSelect.appendChild(o);
    });
    var toggles = $("head-toggles");
    clear(toggles);
    v.headLabels.forEach(function (label, h) {
      var lab = el("label", "head-toggle");
      lab.title = label;
      var box = el("input");
      box.type = "checkbox";
      box.dataset.head = String(h);
      box.addEventListener("change", function () {
        state.heads[h] = box.checked;
        render();
      });
      var sw = el("span", "swatch");
      sw.style.background = headColour(h);
      lab.appendChild(box);
      lab.appendChild(sw);
      lab.appendChild(document.createTextNode(label.replace(/^head /, "")));
      toggles.appendChild(lab);
    });
    var image = v.kind === "image";
    $("query-select").hidden = !image;
    $("query-label").hidden = !image;
    $("text-view").hidden = image;
    $("image-view").hidden = !image;
    if (image) {
      var qs = $("query-select");
      clear(qs);
      v.queryTokens.forEach(function (token, q) {
        var o = el("option", "", q + ": " + token);
        o.value = String(q);
        qs.appendChild(o);
      });
    } else {
      buildTokens(v);
    }
  }

  function syncControls() {
    $("layer-select").value = String(state.layer);
    var boxes = $("head-toggles").querySelectorAll("input");
    for (var i = 0; i < boxes.length; i++) boxes[i].checked = !!state.heads[i];
    $("query-select").value = String(state.query);
    var tabs = $("view-tabs").children;
    for (var j = 0; j < tabs.length; j++) {
      tabs[j].setAttribute("aria-selected", String(j === state.view));
    }
    $("mode-head").setAttribute("aria-pressed", String(state.mode === "head"));
    $("mode-model").setAttribute("aria-pressed", String(state.mode === "model"));
    $("head-panel").hidden = state.mode !== "head";
    $("model-panel").hidden = state.mode !== "model";
  }

  function selectView(i) {
    state.view = i;
    state.layer = 0;
    state.heads = view().headLabels.map(function () { return true; });
    state.focus = state.pinned = null;
    state.query = 0;
    buildControls();
    render();
  }

  // ----- head view: text ----------------------------------------------------------------

  function buildTokens(v) {
    var cross = v.kind === "cross";
    $("left-head").textContent = cross ? "target (queries)" : "query: attends from";
    $("right-head").textContent = cross ? "source (keys)" : "key: attended to";
    [["tokens-left", v.queryTokens, "q"], ["tokens-right", v.keyTokens, "k"]].forEach(
      function (spec) {
        var col = $(spec[0]);
        clear(col);
        spec[1].forEach(function (token, i) {
          var t = el("div", "tok" + (isSpecial(token) ? " special" : ""), token);
          t.dataset.index = String(i);
          t.title = token + "  (" + (spec[2] === "q" ? "query " : "key ") + i + ")";
          t.addEventListener("mouseenter", function () { setFocus({ side: spec[2], index: i }); });
          t.addEventListener("mouseleave", function () { setFocus(null); });
          t.addEventListener("click", function () { togglePin({ side: spec[2], index: i }); });
          col.appendChild(t);
        });
      });
  }

  function setFocus(focus) {
    state.focus = focus;
    render();
  }

  function togglePin(focus) {
    var same = state.pinned && state.pinned.side === focus.side &&
      state.pinned.index === focus.index;
    state.pinned = same ? null : focus;
    render();
  }

  function drawText(v) {
    var heads = selectedHeads();
    var T = v.shape[2], S = v.shape[3];
    var focus = state.focus || state.pinned;
    var svg = $("lines");
    clear(svg);
    svg.setAttribute("width", String(LINES_WIDTH));
    svg.setAttribute("height", String(Math.max(T, S) * ROW));
    heads.forEach(function (h, j) {
      // Spread the heads a little within each token row so overlapping lines stay visible.
      var dy = ((j + 0.5) / heads.length - 0.5) * ROW * 0.5;
      for (var q = 0; q < T; q++) {
        if (focus && focus.side === "q" && focus.index !== q) continue;
        var r = row(v, state.layer, h, q);
        for (var k = 0; k < S; k++) {
          if (focus && focus.side === "k" && focus.index !== k) continue;
          if (r[k] < MIN_LINE_F32) continue;
          var line = document.createElementNS(SVG_NS, "line");
          line.setAttribute("x1", "2");
          line.setAttribute("y1", (q * ROW + ROW / 2 + dy).toFixed(1));
          line.setAttribute("x2", String(LINES_WIDTH - 2));
          line.setAttribute("y2", (k * ROW + ROW / 2 + dy).toFixed(1));
          line.setAttribute("stroke", headColour(h));
          line.setAttribute("stroke-opacity", r[k].toFixed(3));
          line.setAttribute("stroke-width", focus ? "3" : "2");
          line.dataset.head = String(h);
          line.dataset.q = String(q);
          line.dataset.k = String(k);
          svg.appendChild(line);
        }
      }
    });
    shadeTokens(v, heads, focus);
  }

  // With a focused token, tint the tokens on the other side by the mean weight of the heads.
  function shadeTokens(v, heads, focus) {
    var left = $("tokens-left").children, right = $("tokens-right").children;
    [left, right].forEach(function (col) {
      for (var i = 0; i < col.length; i++) {
        col[i].classList.remove("active", "pinned");
        col[i].style.backgroundColor = "";
      }
    });
    if (!focus || !heads.length) return;
    var own = focus.side === "q" ? left : right;
    var other = focus.side === "q" ? right : left;
    own[focus.index].classList.add("active");
    var pin = state.pinned;
    if (pin && pin.side === focus.side && pin.index === focus.index) {
      own[focus.index].classList.add("pinned");
    }
    for (var i = 0; i < other.length; i++) {
      var sum = 0;
      heads.forEach(function (h) {
        sum += focus.side === "q" ? weight(v, state.layer, h, focus.index, i)
          : weight(v, state.layer, h, i, focus.index);
      });
      var mean = sum / heads.length;
      if (mean >= 0.005) {
        var alpha = Math.min(0.85, 0.08 + 1.2 * mean).toFixed(3);
        other[i].style.backgroundColor = "rgba(36, 87, 197, " + alpha + ")";
      }
    }
  }

  // ----- details panel ------------------------------------------------------------------

  function drawDetails(v) {
    var focus = state.focus || state.pinned;
    var box = $("details-rows");
    clear(box);
    var layer = v.layerLabels[state.layer];
    if (!focus) {
      $("details-title").textContent = v.kind === "image" ? "Pick a query" : "Hover a token";
      $("details-help").textContent = v.kind === "image"
        ? "Choose a query above or click a patch of the image."
        : "Left: the weights a query gives. Right: who attends to a key. Click to pin.";
      return;
    }
    var heads = selectedHeads();
    var byQuery = focus.side === "q";
    var tokens = byQuery ? v.queryTokens : v.keyTokens;
    var others = byQuery ? v.keyTokens : v.queryTokens;
    $("details-title").textContent = (byQuery ? "Row of " : "Column of ") + "\u201c" +
      tokens[focus.index] + "\u201d (" + (byQuery ? "query " : "key ") + focus.index + ")";
    $("details-help").textContent = layer + (byQuery
      ? ": the weights it gives, largest first (each head's row sums to 1)"
      : ": the queries that attend to it most");
    $("details").dataset.side = focus.side;
    $("details").dataset.index = String(focus.index);
    heads.forEach(function (h) {
      var values = [];
      var n = byQuery ? v.shape[3] : v.shape[2];
      for (var i = 0; i < n; i++) {
        values.push([i, byQuery ? weight(v, state.layer, h, focus.index, i)
          : weight(v, state.layer, h, i, focus.index)]);
      }
      values.sort(function (a, b) { return b[1] - a[1] || a[0] - b[0]; });
      var block = el("div", "detail-block");
      block.dataset.head = String(h);
      var title = el("div", "detail-head");
      var sw = el("span", "swatch");
      sw.style.background = headColour(h);
      title.appendChild(sw);
      title.appendChild(document.createTextNode(v.headLabels[h]));
      block.appendChild(title);
      box.appendChild(block);
      values.slice(0, TOP_K).forEach(function (pair) {
        var r = el("div", "detail-row");
        r.dataset.head = String(h);
        r.dataset[byQuery ? "key" : "query"] = String(pair[0]);
        r.dataset.weight = fmt(pair[1]);
        var key = el("span", "detail-key", others[pair[0]]);
        key.title = others[pair[0]] + " (" + pair[0] + ")";
        var barBox = el("span");
        var bar = el("span", "detail-bar");
        bar.style.display = "block";
        bar.style.width = Math.max(1, Math.round(pair[1] * 52)) + "px";
        bar.style.background = headColour(h);
        barBox.appendChild(bar);
        r.appendChild(key);
        r.appendChild(barBox);
        r.appendChild(el("span", "detail-weight", fmt(pair[1])));
        block.appendChild(r);
      });
    });
  }

  // ----- head view: image patches -------------------------------------------------------

  function imageCanvas(v) {
    if (!v.image) return null;
    if (v.imageCanvas) return v.imageCanvas;
    var bin = atob(v.image.rgba);
    var pixels = new Uint8ClampedArray(bin.length);
    for (var i = 0; i < bin.length; i++) pixels[i] = bin.charCodeAt(i);
    var c = document.createElement("canvas");
    c.width = v.image.width;
    c.height = v.image.height;
    c.getContext("2d").putImageData(new ImageData(pixels, c.width, c.height), 0, 0);
    v.imageCanvas = c;
    return c;
  }

  // Mean over `heads` of query q's weights on the patches (the [CLS] key, if any, left out).
  function patchWeights(v, heads, q) {
    var offset = patchOffset(v), n = v.grid[0] * v.grid[1];
    var out = new Float32Array(n);
    heads.forEach(function (h) {
      var r = row(v, state.layer, h, q);
      for (var p = 0; p < n; p++) out[p] += r[offset + p] / heads.length;
    });
    return out;
  }

  function paintPatches(canvas, v, heads, q) {
    var ctx = canvas.getContext("2d");
    var W = canvas.width, H = canvas.height, rows = v.grid[0], cols = v.grid[1];
    var img = imageCanvas(v);
    ctx.fillStyle = "#20242c";
    ctx.fillRect(0, 0, W, H);
    if (img) {
      ctx.imageSmoothingEnabled = true;
      ctx.drawImage(img, 0, 0, W, H);
      ctx.fillStyle = "rgba(0, 0, 0, 0.45)"; // dim the picture so the attention stands out
      ctx.fillRect(0, 0, W, H);
    }
    var max = 0;
    if (heads.length) {
      var w = patchWeights(v, heads, q);
      for (var p = 0; p < w.length; p++) max = Math.max(max, w[p]);
      for (var r = 0; r < rows; r++) {
        for (var c = 0; c < cols; c++) {
          var t = max > 0 ? w[r * cols + c] / max : 0;
          var rgb = heat(t);
          ctx.fillStyle = "rgba(" + rgb.join(",") + "," + (0.8 * t).toFixed(3) + ")";
          ctx.fillRect(c * W / cols, r * H / rows, W / cols + 0.5, H / rows + 0.5);
        }
      }
    }
    var patch = q - patchOffset(v);
    if (patch >= 0 && patch < rows * cols) {
      ctx.strokeStyle = "#ffffff";
      ctx.lineWidth = 2;
      ctx.setLineDash([4, 3]);
      ctx.strokeRect((patch % cols) * W / cols + 1, Math.floor(patch / cols) * H / rows + 1,
        W / cols - 2, H / rows - 2);
      ctx.setLineDash([]);
    }
    return max;
  }

  function drawImageView(v) {
    var heads = selectedHeads();
    var canvas = $("image-canvas");
    var aspect = v.image ? v.image.height / v.image.width : v.grid[0] / v.grid[1];
    canvas.width = 448;
    canvas.height = Math.round(448 * aspect);
    var max = paintPatches(canvas, v, heads, state.query);
    drawLegend(max, heads.length, patchOffset(v) > 0);
    var box = $("head-images");
    clear(box);
    heads.forEach(function (h) {
      var cell = el("div", "head-image");
      var c = el("canvas");
      c.width = 104;
      c.height = Math.round(104 * aspect);
      c.dataset.head = String(h);
      c.style.borderColor = headColour(h);
      paintPatches(c, v, [h], state.query);
      c.addEventListener("click", function () { onlyHead(h); });
      c.title = v.headLabels[h] + " alone: click to show only this head";
      cell.appendChild(c);
      cell.appendChild(el("span", "", v.headLabels[h]));
      box.appendChild(cell);
    });
    state.focus = { side: "q", index: state.query };
  }

  function drawLegend(max, nHeads, hasCls) {
    var legend = $("image-legend");
    clear(legend);
    legend.appendChild(el("span", "", "0"));
    var bar = el("canvas");
    bar.width = 120;
    bar.height = 10;
    var ctx = bar.getContext("2d");
    for (var x = 0; x < 120; x++) {
      ctx.fillStyle = "rgb(" + heat(x / 119).join(",") + ")";
      ctx.fillRect(x, 0, 1, 10);
    }
    legend.appendChild(bar);
    var notes = [];
    if (nHeads > 1) notes.push("mean of " + nHeads + " heads");
    if (hasCls) notes.push("the weight on the first key ([CLS]) is not drawn");
    var note = notes.length ? "  (" + notes.join("; ") + ")" : "";
    legend.appendChild(el("span", "", fmt(max) + note));
  }

  function onlyHead(h) {
    state.heads = state.heads.map(function (_, i) { return i === h; });
    render();
  }

  // ----- model view ---------------------------------------------------------------------

  function drawModel(v) {
    var L = v.shape[0], H = v.shape[1], T = v.shape[2], S = v.shape[3];
    var grid = $("model-grid");
    clear(grid);
    grid.style.gridTemplateColumns = "auto repeat(" + H + ", 76px)";
    grid.appendChild(el("span", "grid-label", ""));
    v.headLabels.forEach(function (label) { grid.appendChild(el("span", "grid-label", label)); });
    for (var l = 0; l < L; l++) {
      grid.appendChild(el("span", "grid-label", v.layerLabels[l]));
      for (var h = 0; h < H; h++) {
        var c = el("canvas", "thumb");
        c.width = S;
        c.height = T;
        c.dataset.layer = String(l);
        c.dataset.head = String(h);
        c.title = v.layerLabels[l] + ", " + v.headLabels[h] + ": click to open in the head view";
        paintThumb(c, v, l, h);
        c.addEventListener("click", openThumb.bind(null, l, h));
        grid.appendChild(c);
      }
    }
    $("model-caption").textContent = v.name + " \u00b7 every layer (rows) \u00d7 head (columns)";
    $("model-hint").textContent = "Each square is one head's " + T + " \u00d7 " + S +
      " weight matrix: row = query, column = key, darker = more weight (shade \u221d " +
      "\u221aweight, so small weights stay visible). Click a square to open it in the head view.";
  }

  function paintThumb(canvas, v, l, h) {
    var T = v.shape[2], S = v.shape[3];
    var ctx = canvas.getContext("2d");
    var img = ctx.createImageData(S, T);
    var rgb = rgbOf(headColour(h));
    for (var q = 0; q < T; q++) {
      var r = row(v, l, h, q);
      for (var k = 0; k < S; k++) {
        var t = Math.sqrt(r[k]);
        var i = 4 * (q * S + k);
        for (var j = 0; j < 3; j++) img.data[i + j] = Math.round(255 + t * (rgb[j] - 255));
        img.data[i + 3] = 255;
      }
    }
    ctx.putImageData(img, 0, 0);
  }

  function openThumb(l, h) {
    state.mode = "head";
    state.layer = l;
    state.heads = state.heads.map(function (_, i) { return i === h; });
    state.focus = state.pinned = null;
    render();
  }

  // ----- top level ----------------------------------------------------------------------

  function caption(v) {
    var heads = selectedHeads();
    var names = heads.map(function (h) { return v.headLabels[h].replace(/^head /, ""); });
    var text = v.name + " \u00b7 " + v.layerLabels[state.layer] + " \u00b7 ";
    if (!heads.length) return text + "no head selected";
    text += (heads.length === 1 ? "head " : "heads ") + names.join(", ");
    return text + " (" + heads.length + " of " + v.headLabels.length + ")";
  }

  function hint(v) {
    if (v.kind === "image") {
      return "Colour over each patch = how much the chosen query attends to it (scaled to " +
        "the largest weight). Pick the query above or click a patch; the dashed box is the " +
        "query's own patch.";
    }
    return "Each line joins a query (left) to a key it attends (right): opacity = weight, " +
      "colour = head; weights under " + MIN_LINE + " are not drawn. Hover a token to see only " +
      "its row, click it to pin.";
  }

  function render() {
    var v = view();
    syncControls();
    if (state.mode === "head") {
      $("caption").textContent = caption(v);
      $("hint").textContent = hint(v);
      if (v.kind === "image") drawImageView(v);
      else drawText(v);
      drawDetails(v);
    } else {
      drawModel(v);
    }
  }

  function footer() {
    var notes = ["Made by qkv. Weights stored to 4 decimals, shown to 3."];
    DATA.views.forEach(function (v) {
      if (v.truncated.queries || v.truncated.keys) {
        notes.push(v.name + ": showing the first " + v.shape[2] + " query and " + v.shape[3] +
          " key tokens (" + v.truncated.queries + " and " + v.truncated.keys + " cut), so rows " +
          "may sum to less than 1.");
      }
    });
    $("footer").textContent = notes.join(" ");
  }

  function init() {
    $("title").textContent = DATA.title;
    buildTabs();
    footer();
    $("mode-head").addEventListener("click", function () { state.mode = "head"; render(); });
    $("mode-model").addEventListener("click", function () { state.mode = "model"; render(); });
    $("layer-select").addEventListener("change", function (e) {
      state.layer = Number(e.target.value);
      render();
    });
    $("heads-all").addEventListener("click", function () {
      state.heads = state.heads.map(function () { return true; });
      render();
    });
    $("heads-none").addEventListener("click", function () {
      state.heads = state.heads.map(function () { return false; });
      render();
    });
    $("query-select").addEventListener("change", function (e) {
      state.query = Number(e.target.value);
      render();
    });
    $("image-canvas").addEventListener("click", function (e) {
      var v = view();
      var rect = e.target.getBoundingClientRect();
      var c = Math.floor((e.clientX - rect.left) / rect.width * v.grid[1]);
      var r = Math.floor((e.clientY - rect.top) / rect.height * v.grid[0]);
      var q = patchOffset(v) + r * v.grid[1] + c;
      if (q >= 0 && q < v.shape[2]) {
        state.query = q;
        render();
      }
    });
    selectView(0);
    document.body.dataset.ready = "1";
  }

  init();
})();
