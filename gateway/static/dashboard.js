/* The user page's 30-day chart: three small panels (tokens, queries, web searches)
   drawn into an inline SVG from the JSON in #chart's data-series attribute.
   Plain JavaScript, no library; the same numbers are in the page's table. */
(function () {
  "use strict";

  var NS = "http://www.w3.org/2000/svg";
  var SERIES = [
    { key: "total_tokens", label: "Tokens", kind: "bars", cls: "s-tokens" },
    { key: "queries", label: "Queries", kind: "line", cls: "s-queries" },
    { key: "web_searches", label: "Web searches", kind: "bars", cls: "s-web" }
  ];
  var PANEL = 96;   // height of one panel's plot area
  var GAP = 34;     // room above each panel for its title
  var LEFT = 8;
  var RIGHT = 8;
  var BOTTOM = 22;  // room for the day labels

  function el(name, attrs, parent) {
    var node = document.createElementNS(NS, name);
    Object.keys(attrs).forEach(function (k) { node.setAttribute(k, String(attrs[k])); });
    if (parent) { parent.appendChild(node); }
    return node;
  }

  function text(parent, x, y, content, attrs) {
    var node = el("text", Object.assign({ x: x, y: y }, attrs || {}), parent);
    node.textContent = content;
    return node;
  }

  function formatter(locale) {
    try { return new Intl.NumberFormat(locale); } catch (e) { return new Intl.NumberFormat("en-US"); }
  }

  function draw(host) {
    var rows = JSON.parse(host.getAttribute("data-series") || "[]");
    if (!rows.length) { return; }
    var nf = formatter(host.getAttribute("data-locale") || "en-US");
    var width = Math.max(host.clientWidth || 0, 280);
    var height = SERIES.length * (PANEL + GAP) + BOTTOM;
    var plot = width - LEFT - RIGHT;
    var step = plot / rows.length;
    var svg = el("svg", {
      xmlns: NS, width: width, height: height, viewBox: "0 0 " + width + " " + height,
      "aria-hidden": "true", focusable: "false"
    });

    SERIES.forEach(function (s, i) {
      var top = i * (PANEL + GAP) + GAP;
      var base = top + PANEL;
      var values = rows.map(function (r) { return Number(r[s.key]) || 0; });
      var max = Math.max.apply(null, values);
      var total = values.reduce(function (a, b) { return a + b; }, 0);
      var scale = max > 0 ? PANEL / max : 0;
      var g = el("g", { "class": "panel", "data-series": s.key }, svg);

      text(g, LEFT, top - 12, s.label, { "class": "title" });
      text(g, width - RIGHT, top - 12, "max " + nf.format(max) + " · total " + nf.format(total),
        { "text-anchor": "end" });
      el("line", { "class": "axis", x1: LEFT, x2: width - RIGHT, y1: base + 0.5, y2: base + 0.5 }, g);
      el("line", { "class": "axis", x1: LEFT, x2: width - RIGHT, y1: top + 0.5, y2: top + 0.5,
        "stroke-dasharray": "2 4" }, g);

      if (s.kind === "bars") {
        var barWidth = Math.max(step * 0.7, 1);
        values.forEach(function (v, j) {
          var h = v * scale;
          var bar = el("rect", {
            "class": s.cls, x: LEFT + j * step + (step - barWidth) / 2, y: base - h,
            width: barWidth, height: Math.max(h, v > 0 ? 1 : 0), rx: Math.min(2, barWidth / 4)
          }, g);
          el("title", {}, bar).textContent = rows[j].day + ": " + nf.format(v);
        });
      } else {
        var points = values.map(function (v, j) {
          return [LEFT + j * step + step / 2, base - v * scale];
        });
        el("path", {
          "class": s.cls,
          d: points.map(function (p, j) { return (j ? "L" : "M") + p[0].toFixed(1) + " " + p[1].toFixed(1); }).join(" ")
        }, g);
        points.forEach(function (p, j) {
          var dot = el("circle", { "class": s.cls + "-dot", cx: p[0], cy: p[1], r: 2.5 }, g);
          el("title", {}, dot).textContent = rows[j].day + ": " + nf.format(values[j]);
        });
      }
    });

    // Day labels under the last panel: first, middle and last day.
    var labelY = height - 6;
    [0, Math.floor((rows.length - 1) / 2), rows.length - 1].forEach(function (j, k) {
      var anchor = k === 0 ? "start" : k === 2 ? "end" : "middle";
      var x = k === 0 ? LEFT : k === 2 ? width - RIGHT : LEFT + j * step + step / 2;
      text(svg, x, labelY, rows[j].day, { "text-anchor": anchor });
    });

    host.replaceChildren(svg);
  }

  function start() {
    var host = document.getElementById("chart");
    if (!host) { return; }
    draw(host);
    var pending = null;
    var lastWidth = host.clientWidth;
    window.addEventListener("resize", function () {
      if (pending) { window.clearTimeout(pending); }
      pending = window.setTimeout(function () {
        if (host.clientWidth !== lastWidth) { lastWidth = host.clientWidth; draw(host); }
      }, 150);
    });
  }

  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", start);
  } else {
    start();
  }
})();
