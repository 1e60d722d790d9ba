"""Int8 decoding (`caption.py --quantize int8`): the decoder's and the head's Linear layers become int8, captions
come out for every image, the logits stay close to fp32, the default path is untouched and misuse fails clearly."""

import datasets
import pytest
import torch
from torch import nn
from transformers import AutoModelForImageTextToText, AutoProcessor

from caption import main
from cnngemma.errors import RunError
from cnngemma.int8 import Int8Linear, quantize_int8
from metrics import evaluation


@pytest.fixture(scope="module")
def test_images(trained_demo, tmp_path_factory):
    """The demo's test-split images, written as the JPEG bytes the dataset stores."""
    test = datasets.load_from_disk(trained_demo[1] / "grouped")["test"]
    folder = tmp_path_factory.mktemp("quantize-images")
    paths = []
    for row in test.cast_column("image", datasets.Image(decode=False)):
        paths.append(folder / row["image_id"])
        paths[-1].write_bytes(row["image"]["bytes"])
    return paths


def load_demo(model_dir):
    model = AutoModelForImageTextToText.from_pretrained(model_dir, trust_remote_code=True).eval()
    return model, AutoProcessor.from_pretrained(model_dir, trust_remote_code=True)


def test_int8_quantizes_the_decoder_and_head_and_keeps_the_logits_close(trained_demo, test_images):
    from PIL import Image

    model, processor = load_demo(trained_demo[0])
    inputs = processor(images=[Image.open(path) for path in test_images])
    with torch.inference_mode():
        fp32_logits = model(**inputs).logits[:, -1]
    embeddings = model.get_input_embeddings().weight.detach().clone()

    assert quantize_int8(model) is model
    quantized = [name for name, module in model.named_modules() if isinstance(module, Int8Linear)]
    linears = [name for name, module in model.named_modules() if type(module) is nn.Linear]
    assert quantized and all(name.startswith("model.language_model.") or name == "lm_head" for name in quantized)
    assert "lm_head" in quantized and not [name for name in linears if "language_model" in name or name == "lm_head"]
    # the input embeddings, tied to the head before, stay fp32; the image side has no int8 layer (above)
    assert torch.equal(model.get_input_embeddings().weight, embeddings)

    with torch.inference_mode():
        int8_logits = model(**inputs).logits[:, -1]
    # Measured on this model: at most 0.08 of the logits' std (0.12), against top-2 gaps of 0.75 and more; the
    # bound leaves room for other CPUs' int8 kernels and still catches a wrong scale (errors of about one std).
    assert (int8_logits - fp32_logits).abs().max() < 0.2 * fp32_logits.std()
    assert torch.equal(int8_logits.argmax(-1), fp32_logits.argmax(-1))


def test_caption_cli_int8_captions_every_image_and_the_default_stays_fp32(trained_demo, test_images, capsys):
    from PIL import Image

    argv = ["--model", str(trained_demo[0]), "--device", "cpu", "--max-new-tokens", "12", *map(str, test_images)]
    assert main([*argv, "--quantize", "int8"]) == 0
    int8_rows = [line.split("\t") for line in capsys.readouterr().out.splitlines()]
    assert [name for name, _ in int8_rows] == list(map(str, test_images))
    # they are the captions of the quantized model, not of the fp32 one
    model, processor = load_demo(trained_demo[0])
    quantized = quantize_int8(model)
    inputs = processor(images=[Image.open(path) for path in test_images])
    generated = quantized.generate(**inputs, max_new_tokens=12, do_sample=False)
    assert [c for _, c in int8_rows] == processor.post_process_image_text_to_text(
        generated, input_ids=inputs["input_ids"]
    )

    assert main(argv) == 0
    default_captions = [line.split("\t")[1] for line in capsys.readouterr().out.splitlines()]
    model, processor = load_demo(trained_demo[0])
    inputs = processor(images=[Image.open(path) for path in test_images])
    generated = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    assert default_captions == processor.post_process_image_text_to_text(generated, input_ids=inputs["input_ids"])


def test_int8_refuses_other_devices_and_mixed_precision(trained_demo, capsys):
    with pytest.raises(SystemExit):
        main(["--model", str(trained_demo[0]), "--device", "cuda:0", "--quantize", "int8", "x.png"])
    assert capsys.readouterr().err.endswith(
        "error: --quantize int8 runs on CPU only, got --device cuda:0. Pass --device cpu or drop it.\n"
    )
    model = nn.Module()
    model.weight = nn.Parameter(torch.zeros(1, device="meta"))
    with pytest.raises(RunError) as error:
        quantize_int8(model)
    assert str(error.value) == (
        "quantize_int8: the model is on meta, but int8 decoding runs on CPU only (torch's dynamic quantization has "
        "no kernels for other devices). Move it with model.cpu() first, or do not quantize."
    )
    with pytest.raises(evaluation.UsageError) as error:
        evaluation.parse_args(["--model", "m", "--quantize", "int8", "--mixed_precision", "bf16"])
    assert str(error.value) == "--mixed_precision bf16 is out of range; expected no with --quantize int8."


def test_int8_takes_a_bf16_checkpoint_as_fp32(trained_demo, test_images):
    """from_pretrained keeps a saved bf16 dtype; the int8 kernels need fp32 activations (before: a RuntimeError)."""
    from PIL import Image

    model, processor = load_demo(trained_demo[0])
    quantized = quantize_int8(model.to(torch.bfloat16))
    assert model.get_input_embeddings().weight.dtype == torch.float32
    inputs = processor(images=[Image.open(path) for path in test_images[:2]])
    generated = quantized.generate(**inputs, max_new_tokens=8, do_sample=False)
    assert generated.shape[0] == 2 and generated.shape[1] > inputs["input_ids"].shape[1]


def test_int8_linear_keeps_each_tokens_precision_compiles_to_the_same_numbers_and_frees_its_weights():
    """torch's dynamic int8 Linear takes one activation range per tensor, so a token beside an outsized one (Gemma's
    `<bos>`) loses its precision; Int8Linear scales each token first. Compiled (dynamo traces the whole forward, as
    in caption.py --quantize int8 --compile) it gives the same numbers, and its packed weights leave the operator's
    table with it."""
    import gc

    from cnngemma import int8

    torch.manual_seed(0)
    for bias in (False, True):
        layer = nn.Linear(64, 48, bias=bias)
        reference = torch.ao.quantization.quantize_dynamic(
            nn.Sequential(layer), {nn.Linear: torch.ao.quantization.per_channel_dynamic_qconfig}, dtype=torch.qint8
        )[0]
        wrapped = int8.Int8Linear(reference)
        x = torch.randn(2, 5, 64)
        x[:, 0] *= 100  # the outsized first token
        exact = layer(x).detach()
        error = (wrapped(x) - exact)[:, 1:].abs().max()
        torch_error = (reference(x) - exact)[:, 1:].abs().max()
        assert error < 0.03 * exact[:, 1:].abs().max() < torch_error / 5  # measured: 0.01-0.013 and 0.76-0.89 of it
        assert (wrapped(x[:1, 1:2]) - exact[:1, 1:2]).abs().max() < 0.03 * exact[:1, 1:2].abs().max()
        compiled = torch.compile(wrapped, backend="eager", fullgraph=True)
        assert torch.equal(compiled(x), wrapped(x))
    handle = wrapped.handle
    assert handle in int8._PACKED
    del wrapped, compiled
    gc.collect()
    assert handle not in int8._PACKED


def test_measure_decoding_refuses_a_folder_without_images_and_zero_rounds(tmp_path, capsys):
    """Checked before any model is loaded, in one line each."""
    from scripts import measure_decoding

    (tmp_path / "notes.txt").write_text("not an image")
    for extra, message in (
        ([], f"--images {tmp_path}: expected a folder of .jpg test images, found none there."),
        (["--rounds", "0"], "--rounds must be >= 1, got 0."),
    ):
        with pytest.raises(SystemExit) as exit_info:
            measure_decoding.main(["--model", str(tmp_path / "none"), "--images", str(tmp_path), *extra])
        assert exit_info.value.code == 2
        assert capsys.readouterr().err.endswith(f"error: {message}\n")
    assert (tmp_path / "notes.txt").read_text() == "not an image"
