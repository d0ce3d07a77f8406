"""`uniref demo`: a local web app (Gradio) to edit and compose images with any number of references.

    uniref demo [--model DIR] [--host 127.0.0.1] [--port 7860] [--device auto]

Two tabs on one loaded pipeline:

- **Edit**: upload references (drag and drop, reorder, remove), a prompt and a negative prompt, the budget
  mode (SELF global / per image), the pixel budget, output size, steps, guidance and seed. The SELF plan
  of both budget modes is shown side by side as the references and numbers change; a run shows a
  progress bar, the output with a PNG download, and a gallery of the results made since the page opened.
- **Synthetic world**: sample a task of `uniref.synthetic` (kind, number of references, seed), run the
  model on it and show references | output | exact answer with the three reward scores.

Every problem with a request (an unreadable, corrupt or oversized image, more references than the budget
holds, an empty prompt, a bad number) is shown in the page as one line; the server keeps serving.

The app listens on 127.0.0.1 unless told otherwise, makes no share link and sends no telemetry (Gradio's
analytics are off). Gradio is an optional dependency (``pip install -e ".[demo]"``) imported only here,
inside the functions that need it, so ``import uniref`` never imports it.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import PIL.Image
import torch

from uniref.cli.edit import MAX_INPUT_PIXELS, EditInputError, load_image, write_image_atomic

__all__ = [
    "DemoError",
    "PlanTable",
    "add_demo_parser",
    "build_app",
    "edit",
    "load_references",
    "plan_table",
    "run_demo",
    "run_synthetic",
]

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
BUDGET_MODES = {"SELF global": "global", "per image": "per_image"}
PLAN_HEADERS = ["image", "input", "SELF size", "SELF tokens", "per-image size", "per-image tokens"]
MAX_STEPS = 1000
# Output and budget ceilings: a typo such as 1000000 must be refused in the page, not exhaust the server.
MAX_PIXELS = MAX_INPUT_PIXELS


class DemoError(ValueError):
    """A problem with a request, shown in the page as one line."""


# --------------------------------------------------------------------------------------------
# The app's functions (plain Python: no Gradio needed, tested directly)
# --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=16)
def _load_cached(path: str, mtime_ns: int, size: int) -> PIL.Image.Image:
    # The plan is redrawn on every change of a number; decode each upload once. (mtime, size) key the
    # file's content so that a path reused for other bytes is decoded again.
    return load_image(path)


def load_references(paths) -> tuple[list[tuple[str, PIL.Image.Image]], list[str]]:
    """Loads uploaded reference files, in order.

    Args:
        paths: file paths (``str`` / ``os.PathLike``; Gradio's upload paths keep the original file name),
            or None for no files.

    Returns:
        ``(references, errors)``: ``references`` the readable ones as ``(file name, RGB PIL image)``;
        ``errors`` one line per file that was left out (missing, empty, not an image, corrupt, larger than
        `MAX_INPUT_PIXELS`), naming the file.
    """
    refs, errors = [], []
    for path in paths or []:
        path = str(path)
        name = Path(path).name
        try:
            st = os.stat(path)
            refs.append((name, _load_cached(path, st.st_mtime_ns, st.st_size)))
        except FileNotFoundError:
            errors.append(f"{name}: the uploaded file is gone; upload it again")
        except EditInputError as exc:
            msg, prefix = str(exc), f"--image {path}"
            errors.append(name + msg[len(prefix) :] if msg.startswith(prefix) else msg)
    return refs, errors


def _multiple(pipe) -> int:
    return pipe.vae_scale_factor * pipe.patch_size


def _output_size(pipe, height, width) -> tuple[int, int] | None:
    """``(height, width)`` from the page's fields (0 and 0: automatic, returned as None)."""
    m = _multiple(pipe)
    h, w = _as_int(height, "output height", 0), _as_int(width, "output width", 0)
    if h == 0 and w == 0:
        return None
    if h == 0 or w == 0:
        raise DemoError("output size: give both height and width, or 0 and 0 for automatic")
    for name, v in (("output height", h), ("output width", w)):
        if v % m:
            raise DemoError(f"{name} {v} must be a multiple of {m} (e.g. {max(m, v // m * m)})")
    if h * w > MAX_PIXELS:
        raise DemoError(f"output size {h}x{w} is above {MAX_PIXELS / 1e6:.0f} megapixels; choose a smaller one")
    return h, w


def _as_int(value, name: str, lo: int, hi: int | None = None) -> int:
    try:
        as_float = float(value)
        v = int(as_float)
    except (TypeError, ValueError, OverflowError):  # None, text, nan, inf
        raise DemoError(f"{name} must be a whole number, got {value!r}") from None
    if v != as_float:
        raise DemoError(f"{name} must be a whole number, got {value!r}")
    if v < lo or (hi is not None and v > hi):
        raise DemoError(f"{name} must be {'>= ' + str(lo) if hi is None else f'in {lo}..{hi}'}, got {v}")
    return v


def _budget(pipe, pixel_budget) -> int:
    m = _multiple(pipe)
    return _as_int(pixel_budget, "pixel budget", m * m, MAX_PIXELS)


@dataclass
class PlanTable:
    """The SELF plan of both budget modes for one set of references.

    ``headers`` and ``rows`` (str cells): one row per reference (original size, then planned size and
    tokens under the global budget and under the per-image budget), the output, and the total image
    sequence. ``tokens`` maps each mode to its total (None where the mode has no plan); ``errors`` holds
    a line per mode that cannot plan (e.g. too many references for the budget).
    """

    headers: list[str]
    rows: list[list[str]]
    tokens: dict[str, int | None]
    errors: list[str]


def plan_table(pipe, images, pixel_budget, height=0, width=0) -> PlanTable:
    """The plan `uniref plan` prints, for the pipeline's geometry and the given references.

    Args:
        pipe: a `UniRefEditPipeline` (its VAE factor x patch size is the side multiple, its
            ``target_pixels`` sizes an automatic output).
        images: the references, PIL images (or anything `UniRefEditPipeline.plan_sizes` accepts).
        pixel_budget: reference pixels: the total (SELF global) or each reference's (per image).
        height, width: output size in pixels; 0 and 0 for the pipeline's automatic size.

    Raises:
        DemoError: no references, or a pixel budget / output size that is not a usable number.
    """
    if not images:
        raise DemoError("no references yet: upload one or more images")
    budget = _budget(pipe, pixel_budget)
    size = _output_size(pipe, height, width)
    m = _multiple(pipe)
    tokens = lambda hw: (hw[0] // m) * (hw[1] // m)  # noqa: E731  (the same arithmetic as `uniref plan`)
    plans, errors = {}, []
    for label, mode in BUDGET_MODES.items():
        try:
            plans[mode] = pipe.plan_sizes([list(images)], budget, mode, *(size or (None, None)))[0]
        except ValueError as exc:
            plans[mode] = None
            errors.append(f"{label}: {exc}; raise the pixel budget or remove references")
    hw = lambda s: f"{s[0]}x{s[1]}"  # noqa: E731
    rows = []
    for k, img in enumerate(images):
        row = [f"ref {k + 1}", hw((img.height, img.width))]
        for mode in BUDGET_MODES.values():
            plan = plans[mode]
            row += [hw(plan[1][k]), str(tokens(plan[1][k]))] if plan else ["-", "-"]
        rows.append(row)
    out = ["output", "-"]
    total = ["total", "-"]
    totals: dict[str, int | None] = {}
    for mode in BUDGET_MODES.values():
        plan = plans[mode]
        if plan is None:
            out += ["-", "-"]
            total += ["-", "-"]
            totals[mode] = None
            continue
        target, refs = plan
        totals[mode] = tokens(target) + sum(tokens(r) for r in refs)
        out += [hw(target), str(tokens(target))]
        total += [f"{sum(h * w for h, w in refs)} px", str(totals[mode])]
    return PlanTable(list(PLAN_HEADERS), rows + [out, total], totals, errors)


def edit(
    pipe,
    images,
    prompt: str,
    negative_prompt: str = "",
    budget_mode: str = "SELF global",
    pixel_budget=None,
    height=0,
    width=0,
    steps=50,
    guidance=4.0,
    seed=0,
) -> PIL.Image.Image:
    """Runs the pipeline on one request from the page and returns the output image (RGB PIL).

    Args:
        images: the references (RGB PIL images), in the order the prompt refers to them.
        budget_mode: a key of `BUDGET_MODES` (``"SELF global"`` / ``"per image"``) or the pipeline's
            name for it (``"global"`` / ``"per_image"``).
        pixel_budget: reference pixels (None: the pipeline's default budget).
        height, width: output size; 0 and 0 for the automatic size.

    Raises:
        DemoError: every problem with the request, as one line.
    """
    if not images:
        raise DemoError("no references: upload at least one image")
    if not (prompt or "").strip():
        raise DemoError("the prompt is empty: describe the edit, e.g. 'put the object of image 2 on image 1'")
    mode = BUDGET_MODES.get(budget_mode, budget_mode)
    if mode not in BUDGET_MODES.values():
        raise DemoError(f"budget mode must be one of {', '.join(BUDGET_MODES)}, got {budget_mode!r}")
    budget = pipe.default_pixel_budget if pixel_budget is None else _budget(pipe, pixel_budget)
    size = _output_size(pipe, height, width)
    steps = _as_int(steps, "steps", 1, MAX_STEPS)
    seed = _as_int(seed, "seed", 0, 2**63 - 1)
    try:
        guidance = float(guidance)
    except (TypeError, ValueError):
        raise DemoError(f"guidance must be a number >= 1, got {guidance!r}") from None
    if not guidance >= 1 or guidance == float("inf"):
        raise DemoError(f"guidance must be a finite number >= 1 (1 disables it), got {guidance}")
    try:
        pipe.plan_sizes([list(images)], budget, mode, None, None)
    except ValueError as exc:
        raise DemoError(f"pixel budget {budget}: {exc}; raise it or remove references") from None
    h, w = size or (None, None)
    try:
        return pipe(
            list(images),
            prompt,
            negative_prompt=negative_prompt or None,
            true_cfg_scale=guidance,
            num_inference_steps=steps,
            generator=torch.Generator().manual_seed(seed),
            pixel_budget=budget,
            budget_mode=mode,
            height=h,
            width=w,
        ).images[0]
    except ValueError as exc:  # the pipeline's own argument checks, e.g. too few steps for its scheduler
        raise DemoError(str(exc).splitlines()[0]) from None


def run_synthetic(pipe, kind: str, num_refs, seed, split: str = "test", steps=50, guidance=1.0):
    """Samples one task of the synthetic world, runs the pipeline on it and scores the output.

    Args:
        kind: one of `uniref.synthetic.KINDS`; ``num_refs`` is used for ``"compose"`` only (2..6).

    Returns:
        ``(task, output, scores)``: the `Task`, the output (RGB PIL, the task's size) and
        `uniref.synthetic.score`'s dict (integration, consistency, quality, overall).
    """
    from uniref.synthetic import score

    task = sample_synthetic(kind, num_refs, seed, split)
    out = edit(
        pipe,
        list(task.images),
        task.prompt,
        steps=steps,
        guidance=guidance,
        seed=0,
        height=task.spec.size,
        width=task.spec.size,
    )
    return task, out, score(task, out)


def sample_synthetic(kind: str, num_refs, seed, split: str = "test"):
    """`uniref.synthetic.sample_task` with the page's fields checked (64 px tasks); raises `DemoError`."""
    from uniref.synthetic import KINDS, SPLITS, sample_task

    if kind not in KINDS:
        raise DemoError(f"task kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if split not in SPLITS:
        raise DemoError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    k = _as_int(num_refs, "references", 2, 6) if kind == "compose" else None
    return sample_task(_as_int(seed, "task seed", 0, 2**63 - 1), kind, k, 64, split)


def synthetic_strip(task, output, path: str | os.PathLike) -> Path:
    """Writes references | output | exact answer as one PNG (the `uniref eval` grid of one case)."""
    from uniref.synthetic.bench import SuiteResult, write_grid

    return write_grid(SuiteResult("demo", "model", {}, {}, [], {}, [task], [output]), path)


# --------------------------------------------------------------------------------------------
# The page
# --------------------------------------------------------------------------------------------


def _import_gradio():
    # Gradio reads this when imported; the Blocks below also pass analytics_enabled=False.
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    try:
        import gradio as gr
    except ImportError:
        raise DemoError('the web demo needs Gradio: pip install -e ".[demo]"') from None
    return gr


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, DemoError):
        return str(exc)
    # not a problem of the request: keep the details in the server's log, one line in the page
    traceback.print_exc()
    first = (str(exc).strip().splitlines() or [""])[0]
    return f"internal error ({type(exc).__name__}: {first}); the server log has the details"


def _message(lines: list[str]) -> str:
    return "\n".join(f"**Error:** {line}  " for line in lines)


def build_app(pipe, model_name: str = "", default_guidance: float = 4.0, title: str = "uniref demo"):
    """The Gradio app (a ``gradio.Blocks``, not launched) around a loaded `UniRefEditPipeline`.

    Args:
        pipe: the loaded pipeline; one sampling runs at a time.
        model_name: how the page names the model (default: the pipeline's folder).
        default_guidance: the guidance slider's start value.

    Element ids the page exposes (for tests and styling): ``references``, ``ref-view``, ``prompt``,
    ``negative``, ``budget-mode``, ``pixel-budget``, ``out-height``, ``out-width``, ``steps``, ``guidance``,
    ``seed``, ``run``, ``message``, ``plan-note``, ``plan``, ``output``, ``download``, ``gallery``; on the
    synthetic tab ``syn-kind``, ``syn-refs``, ``syn-seed``, ``syn-split``, ``syn-steps``, ``syn-sample``,
    ``syn-run``, ``syn-prompt``, ``syn-refs-view``, ``syn-strip``, ``syn-scores``, ``syn-message``.
    """
    gr = _import_gradio()
    import pandas as pd

    from uniref.synthetic import KINDS, SPLITS

    lock = threading.Lock()  # one pipeline, one sampling at a time (the two tabs' events run in parallel)
    out_dir = Path(tempfile.mkdtemp(prefix="uniref-demo-"))
    counter = iter(range(1, 1 << 62))
    m = _multiple(pipe)

    def plan_view(files, pixel_budget, height, width):
        refs, errors = load_references(files)
        images = [img for _, img in refs]
        previews = [(img, f"image {k}") for k, (_, img) in enumerate(refs, start=1)]
        if not images:
            return pd.DataFrame(columns=PLAN_HEADERS), [], "Upload references to see the plan.", _message(errors)
        try:
            table = plan_table(pipe, images, pixel_budget, height, width)
        except Exception as exc:  # noqa: BLE001  (shown in the page; the server keeps serving)
            return gr.skip(), previews, f"**Plan:** {_one_line(exc)}", _message(errors)
        g, p = table.tokens["global"], table.tokens["per_image"]
        note = (
            f"{len(images)} reference(s), pixel budget {int(float(pixel_budget))} "
            f"({float(pixel_budget) ** 0.5:.0f}²): image sequence of **{g if g is not None else '-'}** tokens "
            f"with SELF's global budget, **{p if p is not None else '-'}** with a budget per image."
        )
        note += "".join(f"  \n**Plan:** {e}" for e in table.errors)
        return pd.DataFrame(table.rows, columns=table.headers), previews, note, _message(errors)

    # A gr.Progress default in a handler's signature makes Gradio show the pipeline's tqdm bar in the page.
    def run(
        files,
        prompt,
        negative,
        mode,
        budget,
        height,
        width,
        steps,
        guidance,
        seed,
        results,
        progress=gr.Progress(track_tqdm=True),
    ):
        start = time.perf_counter()
        try:
            refs, errors = load_references(files)
            if errors:
                raise DemoError(errors[0] + " -- remove it to run")
            with lock:
                image = edit(
                    pipe, [img for _, img in refs], prompt, negative, mode, budget, height, width, steps, guidance, seed
                )
            path = out_dir / f"uniref-{next(counter):04d}-seed{int(float(seed))}.png"
            write_image_atomic(image, path)
            results = [(str(path), f"{prompt.strip()[:60]} ({mode}, seed {int(float(seed))})"), *results]
        except Exception as exc:  # noqa: BLE001  (shown in the page; the server keeps serving)
            return gr.skip(), gr.skip(), gr.skip(), gr.skip(), _message([_one_line(exc)])
        done = (
            f"Done: {image.width}x{image.height}, {int(float(steps))} steps, seed {int(float(seed))}, "
            f"in {time.perf_counter() - start:.1f} s."
        )
        return image, str(path), results, results, done

    def synthetic_sample(kind, k, seed, split):
        try:
            task = sample_synthetic(kind, k, seed, split)
        except Exception as exc:  # noqa: BLE001
            return gr.skip(), gr.skip(), _message([_one_line(exc)])
        return list(task.images), task.prompt, ""

    def synthetic_run(kind, k, seed, split, steps, guidance, progress=gr.Progress(track_tqdm=True)):
        try:
            with lock:
                task, out, scores = run_synthetic(pipe, kind, k, seed, split, steps, guidance)
            path = synthetic_strip(task, out, out_dir / f"synthetic-{next(counter):04d}.png")
        except Exception as exc:  # noqa: BLE001
            return gr.skip(), gr.skip(), gr.skip(), gr.skip(), _message([_one_line(exc)])
        names = ["integration", "consistency", "quality", "overall"]
        table = pd.DataFrame([[f"{scores[name]:.3f}" for name in names]], columns=names)
        return list(task.images), task.prompt, str(path), table, ""

    # delete_cache: uploads and results in Gradio's cache older than a day are removed hourly
    with gr.Blocks(title=title, analytics_enabled=False, delete_cache=(3600, 86400)) as app:
        gr.Markdown(
            f"## {title}\nMulti-reference editing with SELF: all references share one pixel budget. "
            f"Model: {model_name or pipe.name_or_path}; sides are multiples of {m} px."
        )
        with gr.Tab("Edit"):
            with gr.Row():
                with gr.Column(scale=4):
                    files = gr.File(
                        label="References (drop images; drag to reorder, x to remove)",
                        file_count="multiple",
                        allow_reordering=True,
                        elem_id="references",
                    )
                    ref_view = gr.Gallery(
                        label="References as the prompt numbers them",
                        columns=6,
                        height=150,
                        format="png",
                        preview=False,
                        fit_columns=False,
                        object_fit="contain",
                        elem_id="ref-view",
                    )
                    prompt = gr.Textbox(
                        label="Prompt",
                        lines=2,
                        elem_id="prompt",
                        placeholder="e.g. put the object of image 2 on the background of image 1",
                    )
                    negative = gr.Textbox(label="Negative prompt", lines=1, elem_id="negative")
                    with gr.Row():
                        mode = gr.Radio(
                            list(BUDGET_MODES), value="SELF global", label="Budget mode", elem_id="budget-mode"
                        )
                        budget = gr.Number(
                            value=pipe.default_pixel_budget,
                            precision=0,
                            minimum=m * m,
                            label="Pixel budget (references)",
                            elem_id="pixel-budget",
                        )
                    with gr.Row():
                        height = gr.Number(
                            value=0, precision=0, minimum=0, label="Output height (0: auto)", elem_id="out-height"
                        )
                        width = gr.Number(
                            value=0, precision=0, minimum=0, label="Output width (0: auto)", elem_id="out-width"
                        )
                    with gr.Row():
                        steps = gr.Slider(1, 100, value=50, step=1, label="Steps", elem_id="steps")
                        guidance = gr.Slider(
                            1, 10, value=default_guidance, step=0.5, label="Guidance", elem_id="guidance"
                        )
                        seed = gr.Number(value=0, precision=0, minimum=0, label="Seed", elem_id="seed")
                    run_btn = gr.Button("Run", variant="primary", elem_id="run")
                    message = gr.Markdown(elem_id="message")
                with gr.Column(scale=5):
                    plan_note = gr.Markdown("Upload references to see the plan.", elem_id="plan-note")
                    plan = gr.Dataframe(
                        label="SELF plan: both budget modes", interactive=False, wrap=True, elem_id="plan"
                    )
                    output = gr.Image(
                        label="Output", type="pil", format="png", interactive=False, height=300, elem_id="output"
                    )
                    download = gr.File(label="Download PNG", interactive=False, elem_id="download")
            results = gr.State([])
            gallery = gr.Gallery(
                label="Results since this page was opened",
                columns=8,
                height=220,
                format="png",
                preview=False,
                fit_columns=False,
                object_fit="contain",
                elem_id="gallery",
            )
        with gr.Tab("Synthetic world"):
            with gr.Row():
                kind = gr.Dropdown(list(KINDS), value="compose", label="Task kind", elem_id="syn-kind")
                k = gr.Slider(2, 6, value=3, step=1, label="References (compose)", elem_id="syn-refs")
                syn_seed = gr.Number(value=0, precision=0, minimum=0, label="Task seed", elem_id="syn-seed")
                split = gr.Dropdown(list(SPLITS), value="test", label="Split", elem_id="syn-split")
                syn_steps = gr.Slider(1, 100, value=50, step=1, label="Steps", elem_id="syn-steps")
                syn_guidance = gr.Slider(1, 10, value=default_guidance, step=0.5, label="Guidance")
            with gr.Row():
                sample_btn = gr.Button("Sample", elem_id="syn-sample")
                syn_run_btn = gr.Button("Run", variant="primary", elem_id="syn-run")
            syn_prompt = gr.Textbox(label="Instruction", interactive=False, elem_id="syn-prompt")
            syn_refs = gr.Gallery(
                label="References",
                columns=6,
                height=160,
                format="png",
                preview=False,
                fit_columns=False,
                object_fit="contain",
                elem_id="syn-refs-view",
            )
            syn_strip = gr.Image(
                label="References | output | exact answer",
                type="filepath",
                interactive=False,
                height=300,
                elem_id="syn-strip",
            )
            syn_scores = gr.Dataframe(label="Reward scores", interactive=False, elem_id="syn-scores")
            syn_message = gr.Markdown(elem_id="syn-message")

        plan_inputs = [files, budget, height, width]
        for trigger in (files.change, budget.change, height.change, width.change):
            trigger(plan_view, plan_inputs, [plan, ref_view, plan_note, message], show_progress="hidden")
        run_btn.click(
            run,
            [files, prompt, negative, mode, budget, height, width, steps, guidance, seed, results],
            [output, download, gallery, results, message],
        )
        syn_args = [kind, k, syn_seed, split]
        sample_btn.click(synthetic_sample, syn_args, [syn_refs, syn_prompt, syn_message])
        syn_run_btn.click(
            synthetic_run,
            syn_args + [syn_steps, syn_guidance],
            [syn_refs, syn_prompt, syn_strip, syn_scores, syn_message],
        )
        app.load(synthetic_sample, syn_args, [syn_refs, syn_prompt, syn_message])
    return app


# The default model makes 64 px images: show them enlarged with visible pixels (downloads keep their size).
_CSS = """
#output img, #syn-strip img { image-rendering: pixelated; width: 100%; height: 100%; object-fit: contain; }
#gallery img, #ref-view img, #syn-refs-view img { image-rendering: pixelated; }
"""


def _theme():
    gr = _import_gradio()
    # system fonts only: the default theme would fetch web fonts, and the page must work offline
    return gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])


def launch(app, host: str = "127.0.0.1", port: int = 7860, block: bool = True):
    """Serves ``app`` on ``host:port``: no share link, no analytics, Gradio's server-side rendering off.

    Returns the URL. With ``block`` it serves until interrupted.
    """
    if host not in LOCAL_HOSTS:
        print(
            f"uniref demo: warning: --host {host} makes the demo reachable from other machines; anyone who can "
            "reach this port can upload images and run the model. Use --host 127.0.0.1 unless you mean it.",
            file=sys.stderr,
            flush=True,
        )
    _, url, _ = app.launch(
        server_name=host,
        server_port=port,
        share=False,
        inbrowser=False,
        quiet=True,
        prevent_thread_lock=True,
        show_error=False,
        ssr_mode=False,
        mcp_server=False,
        max_file_size=256 * 1024 * 1024,
        theme=_theme(),
        css=_CSS,
    )
    print(f"uniref demo: serving on http://{host}:{port}/ (Ctrl+C to stop)", flush=True)
    if block:
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
        finally:
            app.close()
    return url


# --------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a port number (1..65535)")
    return port


def add_demo_parser(subparsers) -> argparse.ArgumentParser:
    """Adds ``demo`` to ``subparsers`` (from ``ArgumentParser.add_subparsers``); ``args.func(args)`` runs it."""
    p = subparsers.add_parser(
        "demo",
        help="a local web app (Gradio) to edit and compose images in the browser",
        description="Serve a web page to edit and compose images with any number of references, with the SELF "
        'plan live and a synthetic-world tab. Needs pip install -e ".[demo]".',
    )
    p.add_argument("--model", metavar="DIR", help="a local pipeline folder (default: the embedded default model)")
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default 127.0.0.1, this machine only; 0.0.0.0 opens it to the network)",
    )
    p.add_argument("--port", type=_port, default=7860, help="port (default 7860)")
    p.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="where to run (default auto: cuda when available, else cpu)",
    )
    p.set_defaults(func=run_demo)
    return p


def run_demo(args: argparse.Namespace) -> int:
    """Runs ``uniref demo``; returns the exit code (2 with one line on stderr for a bad request)."""
    from uniref.cli.edit import _load_pipeline

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    try:
        _import_gradio()
        pipe = _load_pipeline(args.model, device)
    except (DemoError, EditInputError) as exc:
        print(f"uniref demo: {exc}", file=sys.stderr)
        return 2
    pipe.set_progress_bar_config(desc="sampling")
    # the embedded default model was trained and evaluated without guidance (README: --guidance 1)
    app = build_app(pipe, args.model or "the embedded default model", 1.0 if args.model is None else 4.0)
    try:
        launch(app, args.host, args.port)
    except OSError:  # Gradio's message speaks of launch() arguments; say it in the command's terms
        print(
            f"uniref demo: cannot listen on {args.host}:{args.port} (in use, or not an address of this machine); "
            "pick another --port or --host",
            file=sys.stderr,
        )
        return 2
    return 0
