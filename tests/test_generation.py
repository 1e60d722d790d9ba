"""Generation paths: the dynamic cache, the static cache and the compiled static cache give the same tokens.

The compiled path is transformers' own: `cache_implementation="static"` plus a `CompileConfig`, which compiles
the decode steps with `fullgraph=True` (the prefill, where the CNN runs, stays eager). A graph break fails it.
"""

import pytest
import torch
from conftest import make_tiny_model, random_images

from cnngemma.inference import compiled_generation

# Prompts of different lengths, so a batch of 4 is left-padded (one row has no padding).
PROMPTS = ["caption en", "caption the whole image en", "caption", "caption this aerial photo please en"]
GREEDY = {"max_new_tokens": 12, "do_sample": False}


@pytest.fixture(scope="module")
def model(tiny_config):
    return make_tiny_model(tiny_config, seed=3)


@pytest.fixture(scope="module")
def inputs(processor):
    inputs = processor(images=random_images(4, seed=5), text=PROMPTS)
    assert inputs["attention_mask"][:, 0].tolist() == [0, 0, 0, 1]  # three rows are padded on the left
    return inputs


@pytest.mark.parametrize("batch", [1, 4])
def test_greedy_tokens_are_the_same_on_every_cache_path(model, inputs, batch):
    batch_inputs = {name: value[:batch] for name, value in inputs.items()}
    dynamic = model.generate(**batch_inputs, **GREEDY)
    static = model.generate(**batch_inputs, **GREEDY, cache_implementation="static")
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = model.generate(**batch_inputs, **GREEDY, **compiled_generation())  # caption.py --compile's path

    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # the decode steps really were compiled
    assert dynamic.shape == (batch, batch_inputs["input_ids"].shape[1] + GREEDY["max_new_tokens"])
    assert torch.equal(static, dynamic)
    assert torch.equal(compiled, dynamic)


def test_beam_search_is_the_same_with_the_dynamic_and_the_static_cache(model, inputs):
    beams = {**GREEDY, "num_beams": 3}
    dynamic = model.generate(**inputs, **beams)
    static = model.generate(**inputs, **beams, cache_implementation="static")
    assert torch.equal(static, dynamic)
    assert not torch.equal(dynamic, model.generate(**inputs, **GREEDY))  # beam search chose other tokens somewhere


def test_a_decode_step_without_position_ids_sees_the_positions_of_the_full_sequence(model, inputs):
    """Outside generate, positions come from the attention mask, also for a step on top of a cache."""
    full = model(**inputs).logits
    prefix = {**inputs, "input_ids": inputs["input_ids"][:, :-1], "attention_mask": inputs["attention_mask"][:, :-1]}
    cache = model(**prefix, use_cache=True).cache
    step = model(
        input_ids=inputs["input_ids"][:, -1:], attention_mask=inputs["attention_mask"], cache=cache, use_cache=True
    ).logits
    torch.testing.assert_close(step[:, -1], full[:, -1], rtol=1e-4, atol=1e-4)
