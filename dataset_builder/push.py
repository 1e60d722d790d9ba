"""`push`: upload a built dataset (pairs as the default config, `grouped` as a second one) and its card."""

from __future__ import annotations

from pathlib import Path

import datasets

from .score import _offline


def push(dataset: str | Path, repo_id: str, private: bool = False) -> str:
    """Push to the Hub; the local folder is only read. Returns the repository URL."""
    dataset = Path(dataset)
    if not (dataset / "stats.json").is_file():
        raise FileNotFoundError(f"--dataset {dataset}: not a dataset_builder output (no stats.json). Expected the "
                                "--output folder of `build`. Fix: build it first.")
    if _offline():
        raise RuntimeError(f"cannot push to {repo_id}: offline mode is on (HF_HUB_OFFLINE=1). The local dataset in "
                           f"{dataset} is unchanged. Fix: unset HF_HUB_OFFLINE on a machine that can reach the Hub "
                           "and log in (hf auth login).")
    from huggingface_hub import HfApi

    pairs = datasets.load_from_disk(str(dataset))
    grouped = datasets.load_from_disk(str(dataset / "grouped"))
    try:
        api = HfApi()
        url = api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
        # The card goes first: push_to_hub then merges its dataset_info/configs metadata into it.
        api.upload_file(path_or_fileobj=str(dataset / "README.md"), path_in_repo="README.md", repo_id=repo_id,
                        repo_type="dataset", commit_message="dataset card")
        pairs.push_to_hub(repo_id, private=private)
        grouped.push_to_hub(repo_id, config_name="grouped", set_default=False, private=private)
    except Exception as error:  # noqa: BLE001 - network, auth and Hub errors all become one actionable line
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise RuntimeError(f"push to {repo_id} failed: {type(error).__name__}: {first_line}. The local dataset in "
                           f"{dataset} is unchanged. Fix: check network access to the Hub and your token "
                           "(hf auth login).") from None
    return str(url)
