"""The dataset card of an export: statistics gathered while streaming, PNG plots, and a generated ``README.md``.

:class:`CardStats` is fed every exported record (constant memory except for the reviews of multi-review samples,
kept for the agreement figures). The plots are simple bar charts drawn with Pillow (no plotting dependency, and
identical bytes for identical statistics: no PNG metadata is written). The agreement figures come from
:func:`annotate.agreement.agreement_report` over the exported samples that have two or more reviews; reviewers are
numbered within each sample there, so no identity is needed (alpha and kappa do not depend on who the raters are).
"""

from __future__ import annotations

import io
import json
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from mcie.exports.records import ExportRecord
from mcie.exports.splits import SPLITS

SCORES = (1, 2, 3, 4, 5)
AGREEMENT_BOOTSTRAP = 200
PLOT_FILES = {
    "scores": "plots/review_scores.png",
    "sub_instructions": "plots/sub_instruction_counts.png",
    "operations": "plots/operations.png",
    "box_sources": "plots/box_sources.png",
}


@dataclass
class CardStats:
    """Running statistics of the exported records."""

    splits: Counter[str] = field(default_factory=Counter)
    datasets: Counter[str] = field(default_factory=Counter)
    n_sub: Counter[int] = field(default_factory=Counter)
    operations: Counter[str] = field(default_factory=Counter)
    box_sources: Counter[str] = field(default_factory=Counter)
    n_reviews: Counter[int] = field(default_factory=Counter)
    quality: Counter[int] = field(default_factory=Counter)
    complexity: Counter[int] = field(default_factory=Counter)
    consistent: Counter[str] = field(default_factory=Counter)
    median_quality: Counter[float] = field(default_factory=Counter)
    median_complexity: Counter[float] = field(default_factory=Counter)
    decisions: Counter[str] = field(default_factory=Counter)
    mllm: Counter[str] = field(default_factory=Counter)
    # source dataset -> the licences recorded at ingest for its instances (None: not stated); filled from the
    # database once the records are written (a licence belongs to the source dataset, not to a record)
    licenses: dict[str, set[str | None]] = field(default_factory=dict)
    multi_reviews: list[tuple[int, str, bool, int, int]] = field(default_factory=list)

    def add(self, record: ExportRecord) -> None:
        self.splits[record.split] += 1
        self.datasets[record.dataset] += 1
        self.n_sub[len(record.sub_instructions)] += 1
        for sub in record.sub_instructions:
            self.operations[sub.operation] += 1
            self.box_sources[sub.box_source or "none"] += 1
        prov = record.provenance
        self.n_reviews[prov.n_reviews] += 1
        for i, review in enumerate(prov.reviews):
            self.quality[review.quality] += 1
            self.complexity[review.complexity] += 1
            self.consistent["yes" if review.consistent else "no"] += 1
            if prov.n_reviews >= 2:
                self.multi_reviews.append(
                    (record.sample_id, f"r{i}", review.consistent, review.quality, review.complexity)
                )
        if prov.aggregated.quality is not None:
            self.median_quality[prov.aggregated.quality] += 1
        if prov.aggregated.complexity is not None:
            self.median_complexity[prov.aggregated.complexity] += 1
        self.decisions["none" if prov.decision is None else f"{prov.decision.source}:{prov.decision.outcome}"] += 1
        self.mllm["none" if prov.mllm_conflict is None else str(prov.mllm_conflict.verdict)] += 1

    @property
    def total(self) -> int:
        return sum(self.splits.values())


def agreement_figures(stats: CardStats, n_boot: int = AGREEMENT_BOOTSTRAP) -> dict[str, Any] | None:
    """Agreement over the exported samples with two or more reviews (None when there are none)."""
    if not stats.multi_reviews:
        return None
    import pandas as pd

    from mcie.annotate.agreement import agreement_report

    frame = pd.DataFrame(stats.multi_reviews, columns=["sample_id", "rater", "consistent", "quality", "complexity"])
    return agreement_report(frame, n_boot=n_boot, seed=0)


# ----------------------------------------------------------------------------------------------------------
# plots

_COLORS = ((55, 126, 184), (228, 26, 28), (77, 175, 74), (152, 78, 163))


def nice_step(raw: float) -> int:
    """The smallest 1, 2 or 5 times a power of ten (at least 1) that is >= ``raw``: a readable tick step."""
    power = 1
    while True:
        for mult in (1, 2, 5):
            if mult * power >= raw:
                return mult * power
        power *= 10


def bar_chart(title: str, categories: Sequence[str], series: Mapping[str, Sequence[int]], *, width: int = 640,
              height: int = 360) -> bytes:
    """A grouped bar chart as PNG bytes (deterministic: no metadata, fixed font)."""
    font = ImageFont.load_default(size=13)
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    left, right, top, bottom = 56, 16, 36, 44
    draw.text((width // 2, 10), title, fill="black", font=font, anchor="mt")
    plot_w, plot_h = width - left - right, height - top - bottom
    draw.line([(left, top), (left, top + plot_h), (left + plot_w, top + plot_h)], fill="black")
    step = nice_step(max([max(values, default=0) for values in series.values()] + [1]) / 4)
    peak = step * math.ceil(max([max(values, default=0) for values in series.values()] + [1]) * 1.05 / step)
    for tick in range(round(peak / step) + 1):
        value = tick * step
        y = top + plot_h - plot_h * value / peak
        draw.line([(left - 4, y), (left, y)], fill="black")
        draw.text((left - 6, y), f"{value:,.0f}", fill="black", font=font, anchor="rm")
    n_cat, n_series = max(len(categories), 1), max(len(series), 1)
    group_w = plot_w / n_cat
    bar_w = group_w * 0.8 / n_series
    for c, category in enumerate(categories):
        x_group = left + c * group_w + group_w * 0.1
        for s, values in enumerate(series.values()):
            value = values[c]
            x0 = x_group + s * bar_w
            y0 = top + plot_h - plot_h * value / peak
            if value > 0:
                draw.rectangle([x0, y0, x0 + bar_w - 1, top + plot_h], fill=_COLORS[s % len(_COLORS)])
            draw.text((x0 + bar_w / 2, y0 - 2), f"{value:,}", fill="black", font=font, anchor="mb")
        draw.text((left + (c + 0.5) * group_w, top + plot_h + 6), category, fill="black", font=font, anchor="mt")
    if len(series) > 1:
        x = left + 8
        for s, name in enumerate(series):
            draw.rectangle([x, top + 2, x + 10, top + 12], fill=_COLORS[s % len(_COLORS)])
            draw.text((x + 14, top + 7), name, fill="black", font=font, anchor="lm")
            x += 24 + int(draw.textlength(name, font=font))
    out = io.BytesIO()
    image.save(out, format="PNG", optimize=False)
    return out.getvalue()


def _sorted_items(counter: Mapping[Any, int]) -> list[tuple[Any, int]]:
    return sorted(counter.items(), key=lambda kv: (str(type(kv[0])), kv[0]))


def plots(stats: CardStats) -> dict[str, bytes]:
    """PNG bytes by relative path: review scores, sub-instruction counts, operation mix and box-source mix."""
    subs = _sorted_items(stats.n_sub)
    ops = [(op, stats.operations.get(op, 0)) for op in ("add", "remove", "change")]
    sources = [(s, stats.box_sources.get(s, 0)) for s in ("mllm", "diff", "human", "truth", "none")]
    return {
        PLOT_FILES["scores"]: bar_chart(
            "Review scores (one count per review)",
            [str(s) for s in SCORES],
            {"quality": [stats.quality.get(s, 0) for s in SCORES],
             "complexity": [stats.complexity.get(s, 0) for s in SCORES]},
        ),
        PLOT_FILES["sub_instructions"]: bar_chart(
            "Sub-instructions per sample", [str(k) for k, _ in subs], {"samples": [v for _, v in subs]}
        ),
        PLOT_FILES["operations"]: bar_chart(
            "Operations of the sub-instructions", [k for k, _ in ops], {"sub-instructions": [v for _, v in ops]}
        ),
        PLOT_FILES["box_sources"]: bar_chart(
            "Box sources of the sub-instructions", [k for k, _ in sources], {"boxes": [v for _, v in sources]}
        ),
    }


# ----------------------------------------------------------------------------------------------------------
# README.md

_LOADING = {
    "jsonl": """```python
import pandas as pd
from mcie.model.data import JsonlEditDataset

train = pd.read_json("train.jsonl", lines=True)          # one row per sample; images under images/
dataset = JsonlEditDataset(".", split="train", resolution=512)  # torch Dataset for MCIE-E1
```""",
    "parquet": """```python
import datasets

ds = datasets.load_dataset("parquet", data_files={"train": "train-*.parquet", "val": "val-*.parquet"})
ds["train"][0]["source_image"]  # a PIL image
```""",
    "webdataset": """```python
from mcie.model.data import webdataset_pipeline

pipeline = webdataset_pipeline(sorted(glob.glob("train-*.tar")), resolution=512)
```""",
}

_DATA_FILES = {
    "jsonl": ("train.jsonl", "val.jsonl"),
    "parquet": ("train-*.parquet", "val-*.parquet"),
    "webdataset": ("train-*.tar", "val-*.tar"),
}


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _share(count: int, total: int) -> str:
    return f"{100 * count / total:.1f}%" if total else "n/a"


def describe_filter(filter_json: Mapping[str, Any]) -> str:
    """The export filter (``ExportFilter.model_dump(mode="json")``) in words, for the card's opening paragraph."""
    statuses = list(filter_json.get("statuses") or ["accepted"])
    words = [f"with status {' or '.join(f'`{s}`' for s in statuses)}"]
    if filter_json.get("min_quality") is not None:
        words.append(f"median review quality at least {filter_json['min_quality']:g}")
    if filter_json.get("min_complexity") is not None:
        words.append(f"median review complexity at least {filter_json['min_complexity']:g}")
    if filter_json.get("reviewers"):
        words.append(f"reviewed by {', '.join(f'`{r}`' for r in filter_json['reviewers'])}")
    if filter_json.get("decided_after"):
        words.append(f"decided at or after {filter_json['decided_after']}")
    if filter_json.get("decided_before"):
        words.append(f"decided before {filter_json['decided_before']}")
    if filter_json.get("datasets"):
        words.append(f"from {', '.join(f'`{d}`' for d in filter_json['datasets'])}")
    return ", ".join(words)


def card_licenses(licenses: Mapping[str, set[str | None]]) -> list[str]:
    """The card's YAML ``license`` values (Hugging Face ids: lower-case SPDX, ``other``, ``unknown``)."""
    found = {(value or "unknown").lower() for values in licenses.values() for value in values}
    return sorted(found) or ["unknown"]


def render_readme(
    stats: CardStats,
    *,
    fmt: str,
    schema_version: int,
    filter_json: Mapping[str, Any],
    options: Mapping[str, Any],
    db_revision: str | None,
    n_images: int | None,
    agreement: Mapping[str, Any] | None,
) -> str:
    """The dataset card (Markdown with a Hugging Face YAML header); a pure function of its arguments."""
    total = stats.total
    train_files, val_files = _DATA_FILES[fmt]
    parts = [
        "---",
        "configs:",
        "- config_name: default",
        "  data_files:",
        "  - split: train",
        f'    path: "{train_files}"',
        "  - split: validation",
        f'    path: "{val_files}"',
        "task_categories:",
        "- image-to-image",
        "license:",
        *[f"- {value}" for value in card_licenses(stats.licenses)],
        "---",
        "",
        "# MCIE complex-instruction editing export",
        "",
        "Complex-instruction image editing samples (source image, complex instruction, sub-instructions with boxes, "
        f"target image) {describe_filter(filter_json)}, exported by `mcie export`. See `manifest.json` for the "
        "checksums of every file.",
        "",
        f"- format: `{fmt}`, record schema version {schema_version}",
        f"- database revision: `{db_revision or 'unknown'}`",
        f"- samples: {total:,} from {len(stats.datasets)} dataset(s)"
        + ("" if n_images is None else f"; {n_images:,} distinct image files"),
        "",
        "## Splits",
        "",
        "Splits are by instance (hash of dataset and external id), so windows of one instance share a split.",
        "",
        _table(["split", "samples", "share"], [(s, stats.splits.get(s, 0), _share(stats.splits.get(s, 0), total))
                                              for s in SPLITS]),
        "",
        "## Source datasets",
        "",
        _table(["dataset", "samples"], _sorted_items(stats.datasets)),
        "",
        "## Licence",
        "",
        "The samples are derived from the source datasets' images and instructions and carry their terms (as "
        "recorded at ingest); a non-commercial licence such as CC-BY-NC-4.0 (SEED-Data-Edit's) binds the whole "
        "export.",
        "",
        _table(["dataset", "licence"],
               [(d, ", ".join(sorted(v or "not stated" for v in stats.licenses.get(d, {None}))))
                for d, _ in _sorted_items(stats.datasets)]),
        "",
        "## Sub-instructions",
        "",
        f"![sub-instruction counts]({PLOT_FILES['sub_instructions']})",
        "",
        _table(["sub-instructions", "samples", "share"], [(k, v, _share(v, total)) for k, v in
                                                          _sorted_items(stats.n_sub)]),
        "",
        f"![operations]({PLOT_FILES['operations']}) ![box sources]({PLOT_FILES['box_sources']})",
        "",
        _table(["operation", "count"], [(k, stats.operations.get(k, 0)) for k in ("add", "remove", "change")]),
        "",
        _table(["box source", "count"], [(k, stats.box_sources.get(k, 0)) for k in
                                         ("mllm", "diff", "human", "truth", "none")]),
        "",
        "## Expert review",
        "",
        f"![review scores]({PLOT_FILES['scores']})",
        "",
        _table(["score", "quality (reviews)", "complexity (reviews)"],
               [(s, stats.quality.get(s, 0), stats.complexity.get(s, 0)) for s in SCORES]),
        "",
        _table(["reviews per sample", "samples"], _sorted_items(stats.n_reviews)),
        "",
        _table(["consistent", "reviews"], [(k, stats.consistent.get(k, 0)) for k in ("yes", "no")]),
        "",
        _table(["median quality", "samples"], _sorted_items(stats.median_quality)),
        "",
        _table(["median complexity", "samples"], _sorted_items(stats.median_complexity)),
        "",
        _table(["decision", "samples"], _sorted_items(stats.decisions)),
        "",
        _table(["MLLM conflict verdict", "samples"], _sorted_items(stats.mllm)),
        "",
        "## Inter-rater agreement",
        "",
    ]
    if agreement is None:
        parts += ["No exported sample has two or more reviews, so no agreement figures.", ""]
    else:
        rows = []
        for name, q in agreement["questions"].items():
            ci = q.get("alpha_ci")
            ci_text = "n/a" if not ci or ci[0] is None else f"[{ci[0]:.3f}, {ci[1]:.3f}]"
            rows.append((name, q.get("alpha"), ci_text, q.get("observed_agreement"), q.get("fleiss_kappa"),
                         q.get("n_units"), q.get("n_ratings")))
        parts += [
            f"Over the {agreement['n_samples']:,} exported samples with two or more reviews "
            f"({agreement['n_reviews']:,} reviews; {agreement['n_boot']} bootstrap resamples, "
            f"seed {agreement['seed']}).",
            "",
            _table(["question", "Krippendorff alpha", "95% CI", "observed agreement", "Fleiss kappa", "samples",
                    "ratings"], rows),
            "",
        ]
    parts += [
        "## Loading",
        "",
        _LOADING[fmt],
        "",
        "## Export settings",
        "",
        "```json",
        json.dumps({"filter": filter_json, "options": options}, indent=2, sort_keys=True),
        "```",
        "",
    ]
    return "\n".join(parts)
