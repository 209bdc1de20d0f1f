"""``mcie train``, ``mcie edit`` and ``mcie eval``: MCIE-E1's commands (registered at the top level of ``mcie``).

- ``mcie train --config configs/train_sd15.toml [--resume | --resume-from CHECKPOINT] [--stop-after N]``:
  :func:`model.train.train` (two stages from one config, exact resume; see :mod:`model.train`).
- ``mcie edit --image IN --instruction TEXT [--sub "text|op|x0,y0,x1,y1" ...] --out OUT.png`` or
  ``mcie edit --batch jobs.jsonl --out-dir DIR``: MCIE-E1 from ``MCIE_EDITING_BASE_MODEL_PATH`` +
  ``MCIE_EDITING_WEIGHTS_PATH`` (without weights: plain InstructPix2Pix, and it says so). Without ``--sub`` an
  MCIE-E1 edit decomposes the instruction through the configured MLLM (``MCIE_MLLM_*``).
- ``mcie eval --bench FOLDER --method NAME=OUTPUTS ... [--model mcie-e1] [--judge/--no-judge] [--json]
  [--markdown OUT.md]``: CLIP-I, DINO-I, L1, L2 and the MLLM-judged IC / BC (:mod:`model.evaluate`).

Heavy modules (torch, diffusers) are imported inside the commands, so ``mcie --help`` stays fast. Exit codes: 1 for a
failure while running, 2 for a bad option, setting or input file (the message names it).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.text import Text

__all__ = ["COMMANDS", "app", "register"]

console = Console(soft_wrap=True, highlight=False, markup=False)
err = Console(stderr=True, soft_wrap=True, highlight=False, markup=False)

BASELINE_NAMES = ("ip2p", "instructpix2pix", "baseline")
_SUB_HELP = ('Sub-instruction "text|op|x0,y0,x1,y1" (op add/remove/change, normalised box; both optional); '
             "repeatable. Without it MCIE-E1 decomposes the instruction through the MLLM.")
_MODEL_HELP = ("Edit the bench first with: mcie-e1 (MCIE_EDITING_WEIGHTS_PATH), ip2p (the baseline), or "
               "NAME=WEIGHTS (folder or Hub id); repeatable.")
_DECOMPOSE_HELP = "--model: decompose the instructions through the MLLM instead of using the bench's boxes."
_JUDGE_HELP = "MLLM-judged IC / BC (default: when an MLLM is configured)."
_OUTPUTS = Path("eval-outputs")


def _fail(message: str, code: int = 2) -> NoReturn:
    err.print(Text.assemble(("error:", "red"), " ", message))
    raise typer.Exit(code)


def _settings() -> Any:
    from mcie.config import settings_or_exit as settings

    return settings()


def _setting(settings: Any, name: str) -> Any:
    """A setting that may not exist yet in this version of mcie.config (e.g. dino_checkpoint)."""
    return getattr(settings, name, None)


# --------------------------------------------------------------------------------------------------------------
# train


def train_command(
    config: Annotated[Path, typer.Option("--config", "-c", help="Training config (.toml / .yaml).")],
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the newest checkpoint.")] = False,
    resume_from: Annotated[Path | None, typer.Option(help="Continue from this checkpoint folder.")] = None,
    output_dir: Annotated[Path | None, typer.Option(help="Override the config's output_dir.")] = None,
    stop_after: Annotated[int | None, typer.Option(min=0, help="Stop (with a checkpoint) at this global step.")] = None,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show a progress bar.")] = True,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as one JSON object.")] = False,
) -> None:
    """Train MCIE-E1 (all stages of the config; paper 3.2, Eq. 12)."""
    from mcie.model.train import TrainError, train
    from mcie.model.train_config import TrainConfigError, load_train_config

    try:
        cfg = load_train_config(config, output_dir=str(output_dir) if output_dir else None)
    except TrainConfigError as exc:
        _fail(str(exc))
    try:
        result = train(cfg, resume=resume, resume_from=resume_from, stop_after=stop_after, progress=progress,
                       settings=_settings(), source=str(config))
    except TrainError as exc:
        _fail(str(exc))
    last = result.losses.get(result.global_step)
    summary = {"output_dir": str(result.output_dir), "global_step": result.global_step,
               "total_steps": result.total_steps, "finished": result.finished, "last_loss": last,
               "resumed_from": None if result.resumed_from is None else str(result.resumed_from),
               "weights": None if result.weights is None else str(result.weights)}
    if as_json:
        print(json.dumps(summary, indent=2))
        return
    if result.resumed_from is not None:
        console.print(f"resumed from {result.resumed_from}")
    if result.finished:
        console.print(f"trained {result.global_step} steps; weights in {result.weights}")
    else:
        console.print(f"stopped at step {result.global_step} of {result.total_steps}; continue with --resume")


# --------------------------------------------------------------------------------------------------------------
# edit


def _editing_model(settings: Any, base: Path | None, weights: Path | None, baseline: bool) -> tuple[Path, Path | None]:
    base = base or settings.editing_base_model_path
    if base is None:
        _fail("no InstructPix2Pix base model: set MCIE_EDITING_BASE_MODEL_PATH (or pass --base)")
    if baseline:
        return Path(base), None
    weights = weights or settings.editing_weights_path
    return Path(base), None if weights is None else Path(weights)


def _needs_decomposition(weights: Path | None) -> bool:
    """Whether the model reads sub-instructions (MCIE-E1 with SACA), from the saved config only."""
    if weights is None:
        return False
    from mcie.model.weights import read_config

    try:
        return read_config(weights).use_saca
    except (FileNotFoundError, ValueError) as exc:
        _fail(f"MCIE weights {weights}: {exc}")


def _decomposer(settings: Any) -> Any:
    from mcie.config import ConfigError
    from mcie.model.evaluate import mllm_decompose

    if settings.mllm_backend == "none":
        _fail(
            "no sub-instructions were given (--sub) and no MLLM is configured to decompose the instruction "
            "(MCIE_MLLM_BACKEND is 'none'): pass --sub, --no-decompose, or configure an MLLM"
        )
    try:
        return mllm_decompose(settings)
    except ConfigError as exc:
        _fail(str(exc))


def _load(settings: Any, base: Path, weights: Path | None, vision: Path | None, decompose: Any, device: str | None,
          quiet: bool) -> Any:
    from mcie.model.evaluate import EvalError, load_pipeline

    if weights is None and not quiet:
        err.print("note: no MCIE-E1 weights (MCIE_EDITING_WEIGHTS_PATH is not set): editing with plain "
                  "InstructPix2Pix, the baseline", highlight=False)
    vision = vision or _setting(settings, "editing_vision_checkpoint")
    try:
        return load_pipeline(base, weights, vision_checkpoint=vision, decompose=decompose,
                             device=device or settings.device)
    except EvalError as exc:
        _fail(f"{exc} (base {base}, weights {weights or 'none'})", 1)


def edit_command(
    image: Annotated[Path | None, typer.Option(help="Source image.")] = None,
    instruction: Annotated[str | None, typer.Option(help="The (complex) editing instruction.")] = None,
    sub: Annotated[list[str] | None, typer.Option(help=_SUB_HELP)] = None,
    no_decompose: Annotated[bool, typer.Option("--no-decompose", help="No sub-instructions, no MLLM.")] = False,
    out: Annotated[Path | None, typer.Option(help="Output image (single edit).")] = None,
    batch: Annotated[Path | None, typer.Option(help="JSONL of edit jobs (see model/evaluate.py).")] = None,
    out_dir: Annotated[Path | None, typer.Option(help="Output folder of --batch (<id>.png).")] = None,
    overwrite: Annotated[bool, typer.Option(help="Batch: redo outputs that exist.")] = False,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    steps: Annotated[int, typer.Option(min=1, help="Denoising steps (Euler Ancestral).")] = 20,
    guidance_scale: Annotated[float, typer.Option(help="Text guidance scale.")] = 7.5,
    image_guidance_scale: Annotated[float, typer.Option(help="Image guidance scale.")] = 1.5,
    resolution: Annotated[int, typer.Option(min=0, help="Shorter side of the edit, pixels (0: as is).")] = 512,
    base: Annotated[Path | None, typer.Option(help="InstructPix2Pix folder or Hub id "
                                                   "(MCIE_EDITING_BASE_MODEL_PATH).")] = None,
    weights: Annotated[Path | None, typer.Option(help="MCIE-E1 weights folder or Hub id "
                                                      "(MCIE_EDITING_WEIGHTS_PATH).")] = None,
    baseline: Annotated[bool, typer.Option("--baseline", help="Plain InstructPix2Pix, ignore weights.")] = False,
    vision_checkpoint: Annotated[Path | None, typer.Option(help="BCCA's open_clip checkpoint (file, Hub id or "
                                                                "tag).")] = None,
    device: Annotated[str | None, typer.Option(help="Torch device (MCIE_DEVICE).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Edit an image (or a JSONL batch) with MCIE-E1, or with plain InstructPix2Pix when there are no weights."""
    from mcie.model.evaluate import EditJob, EvalError, SubSpec, edit_one, parse_sub, read_jobs, run_edits

    if (image is None) == (batch is None):
        _fail("give either --image with --instruction and --out, or --batch with --out-dir")
    if sub and no_decompose:
        _fail("--sub and --no-decompose exclude each other")
    jobs: list[EditJob]
    try:
        if batch is not None:
            if out_dir is None:
                _fail("--batch needs --out-dir")
            jobs = read_jobs(batch)
        else:
            if not instruction or out is None:
                _fail("--image needs --instruction and --out")
            assert image is not None and instruction is not None
            if not image.is_file():
                _fail(f"--image {image}: no such file")
            subs: tuple[SubSpec, ...] | None = tuple(parse_sub(s) for s in sub) if sub else None
            if no_decompose:
                subs = ()
            jobs = [EditJob("edit", image, instruction, subs, seed=seed)]
    except EvalError as exc:
        _fail(str(exc))
    settings = _settings()
    base_path, weights_path = _editing_model(settings, base, weights, baseline)
    decompose = None
    if _needs_decomposition(weights_path) and any(job.sub_instructions is None for job in jobs):
        decompose = _decomposer(settings)
    pipe = _load(settings, base_path, weights_path, vision_checkpoint, decompose, device, as_json)
    model_name = "instructpix2pix" if weights_path is None else "mcie-e1"
    options = {"steps": steps, "guidance_scale": guidance_scale, "image_guidance_scale": image_guidance_scale,
               "seed": seed, "resolution": resolution or None}
    try:
        if batch is not None:
            assert out_dir is not None
            records = run_edits(pipe, jobs, out_dir, overwrite=overwrite, progress=not as_json, **options)
        else:
            assert out is not None
            edited, used = edit_one(pipe, jobs[0], **options)
            out.parent.mkdir(parents=True, exist_ok=True)
            edited.save(out)
            records = [{"id": jobs[0].id, "output": str(out), "skipped": False, "sub_instructions": used}]
    except Exception as exc:  # the MLLM (DecompositionError), an unreadable image, the model
        _fail(f"{type(exc).__name__}: {exc}", 1)
    summary = {"model": model_name, "weights": None if weights_path is None else str(weights_path), **options,
               "edits": records}
    if as_json:
        print(json.dumps(summary, indent=2))
        return
    for record in records:
        if record["skipped"]:
            console.print(f"{record['id']}: kept existing {record['output']}")
            continue
        used = "; ".join(f"{s['text']} {s['box'] or 'whole image'}" for s in record["sub_instructions"]) or "none"
        console.print(f"saved {record['output']} ({model_name}; sub-instructions: {used})", highlight=False)


# --------------------------------------------------------------------------------------------------------------
# eval


def _named(values: list[str] | None, option: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for value in values or []:
        name, sep, target = value.partition("=")
        if not name.strip() or (option == "--method" and (not sep or not target.strip())):
            _fail(f"{option} {value!r}: expected NAME=FOLDER" if option == "--method" else f"{option} {value!r}")
        if name in out:
            _fail(f"{option}: the name {name!r} is used twice")
        out[name.strip()] = target.strip()
    return out


def eval_command(
    bench: Annotated[Path, typer.Option(help="Benchmark folder with bench.jsonl (see model/evaluate.py).")],
    method: Annotated[list[str] | None, typer.Option(help="NAME=FOLDER of <id>.png outputs (repeatable).")] = None,
    model: Annotated[list[str] | None, typer.Option(help=_MODEL_HELP)] = None,
    outputs: Annotated[Path, typer.Option(help="Where --model writes (<outputs>/<name>/).")] = _OUTPUTS,
    decompose: Annotated[bool, typer.Option("--decompose", help=_DECOMPOSE_HELP)] = False,
    judge: Annotated[bool | None, typer.Option("--judge/--no-judge", help=_JUDGE_HELP)] = None,
    clip_model: Annotated[str | None, typer.Option(help="open_clip architecture (MCIE_CLIP_MODEL).")] = None,
    clip_checkpoint: Annotated[str | None, typer.Option(help="open_clip checkpoint: file, Hub id or pretrained tag "
                                                             "(MCIE_CLIP_CHECKPOINT).")] = None,
    dino_checkpoint: Annotated[str | None, typer.Option(help="DINOv2: transformers folder or Hub id "
                                                             "(MCIE_DINO_CHECKPOINT).")] = None,
    resolution: Annotated[int, typer.Option(min=1, help="Resolution of the L1 / L2 comparison.")] = 512,
    reference: Annotated[str, typer.Option(help="target, source (reference-free) or auto: the targets when every "
                                                "item has one, else the sources.")] = "auto",
    steps: Annotated[int, typer.Option(min=1, help="--model: denoising steps.")] = 20,
    seed: Annotated[int, typer.Option(help="--model: random seed.")] = 0,
    guidance_scale: Annotated[float, typer.Option(help="--model: text guidance scale.")] = 7.5,
    image_guidance_scale: Annotated[float, typer.Option(help="--model: image guidance scale.")] = 1.5,
    edit_resolution: Annotated[int, typer.Option(min=0, help="--model: shorter side of the edits (0: as is).")] = 512,
    vision_checkpoint: Annotated[Path | None, typer.Option(help="--model: BCCA's open_clip checkpoint.")] = None,
    device: Annotated[str | None, typer.Option(help="Torch device (MCIE_DEVICE).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    markdown: Annotated[Path | None, typer.Option(help="Also write the table as Markdown here.")] = None,
    details: Annotated[Path | None, typer.Option(help="Write one JSON line per (method, item) here.")] = None,
) -> None:
    """Score methods on a benchmark: CLIP-I, DINO-I, L1, L2 (against targets, or the sources when the bench has
    none), background L1 / L2 / DINO-I outside the edit regions, and the MLLM-judged IC / BC (paper 4.1)."""
    from mcie.model.evaluate import (
        ClipImageEncoder,
        DinoImageEncoder,
        EvalError,
        bench_reference,
        evaluate,
        load_bench,
        run_edits,
    )

    settings = _settings()
    methods = _named(method, "--method")
    models = _named(model, "--model")
    clash = sorted(set(methods) & set(models))
    if clash:
        _fail(f"the name {clash[0]!r} is both a --method and a --model")
    if not methods and not models:
        _fail("nothing to evaluate: give --method NAME=FOLDER and/or --model NAME")
    try:
        items = load_bench(bench)
        bench_reference(items, reference)  # a mixed bench fails here, before any edit is run
    except EvalError as exc:
        _fail(str(exc))
    for name, spec in models.items():
        base_path, weights_path = _editing_model(settings, None, Path(spec) if spec else None,
                                                 name.lower() in BASELINE_NAMES and not spec)
        if weights_path is None and name.lower() not in BASELINE_NAMES:
            _fail(f"--model {name}: no weights (set MCIE_EDITING_WEIGHTS_PATH or use {name}=WEIGHTS_FOLDER)")
        unboxed = decompose or any(item.sub_instructions is None for item in items)
        decomposer = _decomposer(settings) if unboxed and _needs_decomposition(weights_path) else None
        pipe = _load(settings, base_path, weights_path, vision_checkpoint, decomposer, device, True)
        err.print(f"editing {len(items)} images with {name} into {outputs / name}", highlight=False)
        try:
            run_edits(pipe, items, outputs / name, steps=steps, guidance_scale=guidance_scale,
                      image_guidance_scale=image_guidance_scale, seed=seed, resolution=edit_resolution or None,
                      use_given_subs=not decompose, progress=not as_json)
        except Exception as exc:  # the MLLM, the model
            _fail(f"--model {name}: {type(exc).__name__}: {exc}", 1)
        methods[name] = str(outputs / name)
        del pipe

    backend = None
    use_judge = judge if judge is not None else settings.mllm_backend != "none"
    if use_judge:
        from mcie.config import ConfigError
        from mcie.mllm.base import make_backend

        try:
            backend = make_backend(settings=settings)
        except ConfigError as exc:
            _fail(f"the IC/BC judge needs an MLLM: {exc} (or pass --no-judge)")
    try:
        checkpoint = clip_checkpoint or settings.clip_checkpoint
        clip = ClipImageEncoder(clip_model or settings.clip_model, checkpoint, device or settings.device) \
            if checkpoint else None
        dino_path = dino_checkpoint or _setting(settings, "dino_checkpoint")
        dino = DinoImageEncoder(dino_path, device or settings.device) if dino_path else None
        report = evaluate(items, methods, clip=clip, dino=dino, judge=backend, resolution=resolution,
                          bench=str(bench), progress=not as_json, reference=reference)
    except EvalError as exc:
        _fail(str(exc))
    finally:
        if backend is not None:
            backend.close()
    table = report.to_markdown()
    if markdown is not None:
        markdown.parent.mkdir(parents=True, exist_ok=True)
        markdown.write_text(table, encoding="utf-8")
    if details is not None:
        details.parent.mkdir(parents=True, exist_ok=True)
        with details.open("w", encoding="utf-8") as handle:
            for result in report.methods.values():
                for row in result.items:
                    handle.write(json.dumps(row) + "\n")
    if as_json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        console.print(table)


COMMANDS = (("train", train_command), ("edit", edit_command), ("eval", eval_command))

app = typer.Typer(no_args_is_help=True, add_completion=False, help="MCIE-E1: train, edit, evaluate.")
for _name, _function in COMMANDS:
    app.command(_name)(_function)


def register(target: typer.Typer) -> None:
    """Add ``train``, ``edit`` and ``eval`` as top-level commands of ``target`` (the ``mcie`` app)."""
    for name, function in COMMANDS:
        target.command(name)(function)
