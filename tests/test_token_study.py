"""scripts/token_study.py: the attribute scores, the seed interval, the precomputed-map path standing in for the real
tower, and a quick end-to-end run that writes the table, the plot and every arm's runs."""

import json
import math

import torch
from conftest import make_tiny_model, random_images

from modeling_cnngemma import CNNGemmaConfig, CNNGemmaProcessor
from scripts import token_study


def test_attribute_scores_count_only_images_whose_references_state_it():
    predictions = ["two red planes in the top left corner", "a forest", "three ships on the right"]
    references = [
        ["there are two white planes in the top left corner ."],  # position and count right, colour wrong
        ["a dense green forest ."],  # colour only: the prediction states none
        ["there are three ships at the top .", "some boats"],  # count right, position wrong
    ]
    scores = token_study.attribute_scores(predictions, references)
    assert (scores["position"], scores["position_images"]) == (0.5, 2)
    assert (scores["count"], scores["count_images"]) == (1.0, 2)
    assert (scores["colour"], scores["colour_images"]) == (0.0, 2)
    # the best constant answer: one value given for every image ("top left" or "top": right on 1 of 2)
    assert (scores["position_constant"], scores["count_constant"], scores["colour_constant"]) == (0.5, 0.5, 0.5)


def test_interval_is_the_t_interval_of_the_mean_over_seeds():
    mean, low, high = token_study.interval([1.0, 2.0, 3.0])
    half = 4.303 * 1.0 / math.sqrt(3)  # t(0.975, 2 degrees of freedom) x sd / sqrt(n)
    assert (mean, round(low, 6), round(high, 6)) == (2.0, round(2 - half, 6), round(2 + half, 6))
    assert token_study.interval([0.7]) == (0.7, 0.7, 0.7)


def test_precomputed_maps_run_the_same_model_as_the_real_tower(tiny_config, tokenizer):
    config = CNNGemmaConfig.from_dict({**tiny_config.to_dict(), "token_mode": "grid", "token_grid": 2})
    model = make_tiny_model(config)
    inputs = CNNGemmaProcessor.from_model_config(config, tokenizer)(images=random_images(2))
    with torch.no_grad():
        real = model.generate(**inputs, max_new_tokens=6, do_sample=False)
        features = model.get_image_features(inputs["pixel_values"])
        maps = model.model.vision_tower.forward_features(
            inputs["pixel_values"].contiguous(memory_format=torch.channels_last)
        )
        model.model.vision_tower = token_study.MapsIn()
        torch.testing.assert_close(model.get_image_features(maps), features)
        assert torch.equal(model.generate(**{**inputs, "pixel_values": maps}, max_new_tokens=6, do_sample=False), real)


def test_quick_study_writes_its_table_plot_and_every_run(tmp_path, capsys):
    assert token_study.main(["--quick", "--output_dir", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    arms = sorted((r["arm"], r["tokens"]) for r in results["runs"])
    # 2 budgets x 1 seed, scored at the contrast arms' step (1) and at the end (2); the two contrast arms
    assert arms == [
        ("frozen pretrained, 1 steps", 1),
        ("frozen pretrained, 1 steps", 4),
        ("frozen pretrained, 2 steps", 1),
        ("frozen pretrained, 2 steps", 4),
        ("trained from scratch, 1 steps", 1),
        ("trained from scratch, 1 steps", 4),
    ]
    assert all(0 <= r[key] <= 1 for r in results["runs"] for key in ("position", "count", "colour", "bleu_4"))
    assert set(results["speed"]) == {"1", "2"} and all(s["median"] > 0 for s in results["speed"].values())
    table = (tmp_path / "table.md").read_text()
    assert "| 4 | frozen pretrained, 2 steps | cider |" in table and "| - | best constant answer | count |" in table
    assert (tmp_path / "tokens.png").stat().st_size > 10_000
    assert "Wrote" in capsys.readouterr().out
