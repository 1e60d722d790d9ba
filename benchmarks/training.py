"""Training speed and memory: optimizer steps per second for each variant and the baseline, under two policies.

- `frozen_lm`: the report's policy, the decoder frozen, encoder and projector trained.
- `lora`: LoRA on the decoder's attention projections, the projector trained, the encoder frozen (eval).
Logits are computed at the caption positions only, so no model pays for full-vocabulary logits over its prompt.
"""

import torch
import torch.nn.functional as F

from .common import (
    BASELINE,
    IMAGE_TOKEN_ID,
    PROMPT_IDS,
    FirstRunMemory,
    image_size_of,
    num_image_tokens,
    summarize,
    time_in_rounds,
)

POLICIES = ("frozen_lm", "lora")
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def _batch(model, batch: int, caption_tokens: int, vocab_size: int, device, dtype) -> dict:
    generator = torch.Generator().manual_seed(0)
    prefix = [IMAGE_TOKEN_ID] * num_image_tokens(model) + PROMPT_IDS
    captions = torch.randint(16, vocab_size, (batch, caption_tokens), generator=generator)
    input_ids = torch.cat([torch.tensor([prefix] * batch), captions], dim=1).to(device)
    size = image_size_of(model)
    inputs = {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "pixel_values": torch.randn(batch, 3, size, size, generator=generator).to(device, dtype),
    }
    if model.config.model_type == "paligemma":
        # PaliGemma's prefix-LM mask: bidirectional over image + prompt (0), causal over the caption (1)
        token_type_ids = torch.zeros_like(input_ids)
        token_type_ids[:, len(prefix) :] = 1
        inputs["token_type_ids"] = token_type_ids
    return {"inputs": inputs, "labels": captions.to(device)}


def _set_policy(model, policy: str):
    """Which parameters train. The shared decoder stays frozen; under `lora` only its adapters train."""
    vision_trains = policy == "frozen_lm"
    model.requires_grad_(False)
    model.model.vision_tower.requires_grad_(vision_trains)
    model.model.multi_modal_projector.requires_grad_(True)
    if policy == "lora":
        for name, param in model.model.language_model.named_parameters():
            param.requires_grad_("lora_" in name)
    model.train()
    if not vision_trains:
        model.model.vision_tower.eval()  # a frozen BatchNorm would still update its running statistics in train mode
    return [p for p in model.parameters() if p.requires_grad]


def _step_fn(model, batch, optimizer, caption_tokens: int):
    softcap = getattr(model.config.text_config, "final_logit_softcapping", None)

    def step():
        hidden = model.model(**batch["inputs"]).last_hidden_state
        # positions whose next token is a caption token: the last prompt token up to the second-to-last caption token
        logits = model.lm_head(hidden[:, -(caption_tokens + 1) : -1])
        if softcap is not None:
            logits = torch.tanh(logits / softcap) * softcap
        loss = F.cross_entropy(logits.flatten(0, 1).float(), batch["labels"].flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def run(args, device, log=print) -> dict:
    from peft import LoraConfig, inject_adapter_in_model

    from .captioning import build_models
    from .common import build_language_model

    dtype = args.torch_dtype
    log(
        f"training: LM {args.lm_size[0]}, batch {args.train_batch_size} (baseline {args.baseline_train_batch_size}), "
        f"{args.caption_tokens} caption tokens, {args.train_rounds} rounds"
    )
    lm_size = args.lm_size[0]  # training times one decoder: the first of --lm-size
    language_model = build_language_model(lm_size).to(device, dtype)
    language_model.requires_grad_(False)
    models = build_models(args, language_model, device, dtype)
    vocab_size = language_model.config.vocab_size
    rows = []
    for policy in POLICIES:
        if policy == "lora":  # one set of adapters in the shared decoder; each model gets its own optimizer
            lora = LoraConfig(r=args.lora_rank, lora_alpha=2 * args.lora_rank, target_modules=LORA_TARGETS)
            inject_adapter_in_model(lora, language_model)
            language_model.to(device, dtype)
        steps, trainable, batch_sizes = {}, {}, {}
        memory = FirstRunMemory(device)
        for name, model in models.items():
            params = _set_policy(model, policy)
            trainable[name] = sum(p.numel() for p in params)
            optimizer = torch.optim.AdamW(params, lr=1e-4)
            batch_sizes[name] = args.baseline_train_batch_size if name == BASELINE else args.train_batch_size
            warm = _batch(model, 1, args.caption_tokens, vocab_size, device, dtype)
            _step_fn(model, warm, optimizer, args.caption_tokens)()  # warm-up; also creates the AdamW state
            batch = _batch(model, batch_sizes[name], args.caption_tokens, vocab_size, device, dtype)
            steps[name] = memory.wrap(name, _step_fn(model, batch, optimizer, args.caption_tokens))

        log(f" policy {policy}")
        times = time_in_rounds(steps, args.train_rounds, args.train_slice_s, device, on_run=memory.on_run, log=log)
        for name in models:
            rows.append(
                {
                    "model": name,
                    "policy": policy,
                    "batch_size": batch_sizes[name],
                    "samples_per_s": summarize([batch_sizes[name] / t for t in times[name]]),
                    "seconds_per_step": summarize(times[name]),
                    "peak_memory_mb": memory.peaks.get(name),
                    "trainable_parameters": trainable[name],
                }
            )
    return {
        "settings": {
            "lm_size": lm_size,
            "batch_size": args.train_batch_size,
            "baseline_batch_size": args.baseline_train_batch_size,
            "caption_tokens": args.caption_tokens,
            "image_size": args.image_size,
            "dtype": args.dtype,
            "device": str(device),
            "optimizer": "AdamW",
            "lora": {"rank": args.lora_rank, "alpha": 2 * args.lora_rank, "targets": LORA_TARGETS},
            "rounds": args.train_rounds,
            "slice_s": args.train_slice_s,
            "memory": "peak rise during one optimizer step over the resident weights (CPU: RSS after malloc_trim)",
        },
        "rows": rows,
        "summary": _summary(rows),
    }


def _summary(rows) -> dict:
    summary = {}
    for policy in POLICIES:
        at = {r["model"]: r for r in rows if r["policy"] == policy}
        base = at[BASELINE]["samples_per_s"]["median"]
        summary[policy] = {name: row["samples_per_s"]["median"] / base for name, row in at.items() if name != BASELINE}
    return summary
