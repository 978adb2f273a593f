"""One self-contained HTML page for a mapping: data as inline JSON, a canvas scatter with hover,
tables; no network at view time. The same page is the ``censusvi report`` file and the Serve
app's ``GET /explorer/{result_id}``.
"""

from __future__ import annotations

import html
import json
from typing import Any

import numpy as np

from censusvi.numeric import json_safe

STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#222;max-width:1200px}
h1{font-size:20px}h2{font-size:16px;margin-top:28px}
#plot{border:1px solid #ccc;cursor:crosshair}
.row{display:flex;gap:24px;align-items:flex-start;flex-wrap:wrap}
#legend{list-style:none;padding:0;margin:0;max-height:560px;overflow:auto;min-width:180px}
#legend li{display:flex;align-items:center;gap:6px;margin:2px 0}
#legend .swatch{width:12px;height:12px;border-radius:6px;display:inline-block}
#tip{position:fixed;pointer-events:none;background:#fff;border:1px solid #888;padding:4px 8px;
 font-size:12px;display:none;box-shadow:0 1px 4px #0003}
table{border-collapse:collapse;margin:6px 0}td,th{border:1px solid #ddd;padding:3px 8px;text-align:right}
th{background:#f4f4f4}td:first-child,th:first-child{text-align:left}
.metric{display:inline-block;margin-right:24px;font-size:16px}
"""

SCRIPT = r"""
const D = JSON.parse(document.getElementById('report-data').textContent);
const Q = D.query, R = D.reference;
const PAL = ['#1f77b4','#ff7f0e','#2ca02c','#d62728','#9467bd','#8c564b','#e377c2','#17becf',
  '#bcbd22','#7f7f7f','#aec7e8','#ffbb78','#98df8a','#ff9896','#c5b0d5','#c49c94','#f7b6d2',
  '#9edae5','#dbdb8d','#393b79'];
const cv = document.getElementById('plot'), ctx = cv.getContext('2d');
const xs = R.x.concat(Q.x), ys = R.y.concat(Q.y);
// a loop, not Math.min(...xs): spreading 200,000 cells as arguments overflows the call stack
const lo = a => a.reduce((m, v) => v < m ? v : m, Infinity), hi = a => a.reduce((m, v) => v > m ? v : m, -Infinity);
const x0 = lo(xs), x1 = hi(xs), y0 = lo(ys), y1 = hi(ys);
const pad = 12, W = cv.width, H = cv.height;
const px = x => pad + (x - x0) / ((x1 - x0) || 1) * (W - 2 * pad);
const py = y => H - pad - (y - y0) / ((y1 - y0) || 1) * (H - 2 * pad);
function categories(values) { return [...new Set(values)].sort(); }
function heat(u) { const r = Math.round(40 + 215 * u), b = Math.round(220 - 200 * u); return `rgb(${r},60,${b})`; }
function colourer(view) {
  if (view === 'uncertainty') return {f: i => heat(Q.uncertainty[i]), legend: null};
  // a Map, not {}: a label named "__proto__" or "constructor" is a key like any other
  const values = Q[view], cats = categories(values), map = new Map(), n = new Map();
  cats.forEach((c, k) => { map.set(c, PAL[k % PAL.length]); n.set(c, 0); });
  values.forEach(v => n.set(v, n.get(v) + 1));
  return {f: i => map.get(values[i]), legend: cats.map(c => [c, map.get(c), n.get(c)])};
}
function draw() {
  const view = document.getElementById('view').value, col = colourer(view);
  ctx.clearRect(0, 0, W, H);
  ctx.fillStyle = '#d0d0d0';
  for (let i = 0; i < R.x.length; i++) ctx.fillRect(px(R.x[i]) - 1.5, py(R.y[i]) - 1.5, 3, 3);
  for (let i = 0; i < Q.x.length; i++) {
    ctx.fillStyle = col.f(i); ctx.beginPath(); ctx.arc(px(Q.x[i]), py(Q.y[i]), 2.6, 0, 6.283); ctx.fill();
  }
  const lg = document.getElementById('legend'); lg.innerHTML = '';
  if (col.legend) for (const [c, colour, n] of col.legend) {
    const li = document.createElement('li'); li.className = 'legend-item'; li.dataset.label = c;
    li.innerHTML = `<span class="swatch" style="background:${colour}"></span>`;
    li.appendChild(document.createTextNode(`${c} (${n})`)); lg.appendChild(li);
  } else lg.innerHTML = '<li>uncertainty: <span style="color:' + heat(0) + '">0</span> → <span style="color:' + heat(1) + '">1</span></li>';
  document.body.dataset.ready = '1'; window.censusviReady = true;
}
cv.addEventListener('mousemove', e => {
  const rect = cv.getBoundingClientRect(), mx = e.clientX - rect.left, my = e.clientY - rect.top;
  let best = -1, bestD = 64, ref = false;
  for (let i = 0; i < Q.x.length; i++) { const d = (px(Q.x[i]) - mx) ** 2 + (py(Q.y[i]) - my) ** 2; if (d < bestD) { bestD = d; best = i; } }
  if (best < 0) for (let i = 0; i < R.x.length; i++) { const d = (px(R.x[i]) - mx) ** 2 + (py(R.y[i]) - my) ** 2; if (d < bestD) { bestD = d; best = i; ref = true; } }
  const tip = document.getElementById('tip');
  if (best < 0) { tip.style.display = 'none'; return; }
  // Labels come from users' files: text nodes only, never parsed as HTML.
  const lines = ref ? [['reference cell'], [`${D.label_key}: `, R.label[best]]] :
    [[`predicted ${D.label_key}: `, Q.predicted[best], true], [`probability ${Q.probability[best].toFixed(3)}`],
     [`uncertainty ${Q.uncertainty[best].toFixed(3)}`], ['batch ', Q.batch[best]]].concat(Q.truth ? [['true label ', Q.truth[best]]] : []);
  tip.replaceChildren();
  lines.forEach(([head, value, bold], k) => {
    if (k) tip.appendChild(document.createElement('br'));
    tip.appendChild(document.createTextNode(head));
    if (value !== undefined) {
      const v = document.createElement(bold ? 'b' : 'span'); v.textContent = String(value); tip.appendChild(v);
    }
  });
  tip.style.left = (e.clientX + 14) + 'px'; tip.style.top = (e.clientY + 14) + 'px'; tip.style.display = 'block';
});
cv.addEventListener('mouseleave', () => document.getElementById('tip').style.display = 'none');
document.getElementById('view').addEventListener('change', draw);
const cal = D.evaluation && D.evaluation.calibration, cc = document.getElementById('calibration');
if (cal && cc) {
  const c2 = cc.getContext('2d'), s = cc.width - 40;
  c2.strokeStyle = '#aaa'; c2.strokeRect(30, 10, s, s); c2.beginPath(); c2.moveTo(30, 10 + s); c2.lineTo(30 + s, 10); c2.stroke();
  c2.strokeStyle = '#d62728'; c2.lineWidth = 2; c2.beginPath();
  cal.forEach((b, k) => { const X = 30 + b.confidence * s, Y = 10 + (1 - b.accuracy) * s; k ? c2.lineTo(X, Y) : c2.moveTo(X, Y); });
  c2.stroke(); c2.fillStyle = '#222'; c2.fillText('confidence →', 30 + s / 2 - 30, 10 + s + 24); c2.fillText('accuracy', 0, 8);
}
draw();
"""


def _table(header: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_fmt(v))}</td>" for v in row) + "</tr>" for row in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def _fmt(v: Any) -> str:
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def batch_counts(stored) -> list[tuple[str, int]]:
    """(batch, cells) pairs of a mapping report's ``cells_per_batch``: ``{"batch", "cells"}``
    lists, or the ``{batch: cells}`` of files mapped before censusvi stored it that way."""
    if not isinstance(stored, dict) or not stored:
        return []
    lists = set(stored) == {"batch", "cells"} and not np.isscalar(stored["batch"])
    pairs = zip(stored["batch"], stored["cells"]) if lists else stored.items()
    return [(str(b), int(np.asarray(n).item())) for b, n in pairs]


def _mapping_section(c: dict) -> str:
    m = c.get("mapping") or {}
    genes = m.get("genes", {})
    parts = ["<h2>Mapping</h2>"]
    if genes:
        parts.append(_table(["genes", "count"], [[k, v] for k, v in genes.items()]))
    batches = batch_counts(m.get("cells_per_batch"))
    new = set(np.asarray(m.get("new_batches", [])).astype(str))
    if batches:
        rows = [[b, n, "new" if b in new else "reference"] for b, n in batches]
        parts.append(_table(["batch", "cells", "kind"], rows))
    if c.get("qc_nll_per_count"):
        q = c["qc_nll_per_count"]
        parts.append(
            "<p>Reconstruction QC (−log p(x|z) per count; high = poorly explained): "
            + ", ".join(f"{int(float(k) * 100)}th pct {v:.3f}" for k, v in q.items())
            + "</p>"
        )
    return "".join(parts)


def _evaluation_section(c: dict) -> str:
    e = c.get("evaluation")
    if not e:
        return "<h2>Evaluation</h2><p>The query carries no true labels the reference holds.</p>"
    conf = e["confusion"]
    rows = [[t, *counts] for t, counts in zip(conf["true"], conf["counts"])]
    return (
        "<h2>Evaluation (cells whose true label the reference holds)</h2>"
        f'<p><span class="metric" id="accuracy">accuracy {e["accuracy"]:.3f}</span>'
        f'<span class="metric" id="macro-f1">macro-F1 {e["macro_f1"]:.3f}</span>'
        f'<span class="metric" id="ece">ECE {e["ece"]:.3f}</span>'
        f'<span class="metric">cells {e["n_cells_with_reference_label"]}</span></p>'
        "<h3>Confusion matrix (rows: true, columns: predicted)</h3>"
        + _table(["true \\ predicted", *conf["predicted"]], rows)
        + '<h3>Calibration</h3><div class="row"><canvas id="calibration" width="300" height="300"></canvas>'
        + _table(
            ["probability bin", "cells", "confidence", "accuracy"],
            [[b["bin"], b["cells"], b["confidence"], b["accuracy"]] for b in e["calibration"]],
        )
        + "</div>"
    )


def render_page(content: dict[str, Any]) -> str:
    views = ["predicted", "uncertainty", "batch"] + (
        ["truth"] if "truth" in content["query"] else []
    )
    options = "".join(f'<option value="{v}">{v}</option>' for v in views)
    counts = _table(
        [f"predicted {content['label_key']}", "cells", "mean probability"],
        [[r["label"], r["cells"], r["mean_probability"]] for r in content["predicted_counts"]],
    )
    if content.get("ontology_counts"):
        counts += (
            "<h3>Cell Ontology answers (the most specific term that clears the threshold)</h3>"
        )
        counts += _table(
            ["term", "name", "cells", "mean probability"],
            [
                [r["term_id"] or "(no term)", r["label"], r["cells"], r["mean_probability"]]
                for r in content["ontology_counts"]
            ],
        )
    scib = ""
    if content.get("scib"):
        header = list(content["scib"][0])
        scib = "<h2>Integration (scib-metrics)</h2>" + _table(
            header, [[row[h] for h in header] for row in content["scib"]]
        )
    # In a script element only "</script" or "<!--" could end the data early: no raw <, >, & at all.
    data = (
        json.dumps(json_safe(content), allow_nan=False)
        .replace("<", "\\u003c")
        .replace(">", "\\u003e")
        .replace("&", "\\u0026")
    )
    title = html.escape(content["title"])
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="generator" content="censusvi"><title>{title}</title><style>{STYLE}</style></head>
<body>
<h1>{title}</h1>
<p>{content["n_query_cells"]} query cells (coloured) on {len(content["reference"]["x"])} reference
cells (grey, at most a few hundred per {html.escape(content["label_key"])}). Hover a point for its
details.</p>
<p>Colour by <select id="view">{options}</select></p>
<div class="row"><canvas id="plot" width="760" height="560"></canvas><ul id="legend"></ul></div>
<div id="tip"></div>
<h2>Predicted labels</h2>{counts}
{_mapping_section(content)}
{_evaluation_section(content)}
{scib}
<script id="report-data" type="application/json">{data}</script>
<script>{SCRIPT}</script>
</body></html>
"""
