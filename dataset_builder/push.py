"""`push`: the one dataset push (card, pairs as the default config, `grouped` as a second one) and the Hub helpers
that `python -m dataset_builder push` and `push_to_hub.py` share: the offline and repo-id checks, one-line Hub
errors."""

from __future__ import annotations

from pathlib import Path


class PushError(RuntimeError):
    """A push that cannot start or failed; the message is one line the user can act on and never holds the token."""


def hub_api(token: str | None = None, fix: str = ""):
    """An HfApi, or a PushError before any request when offline mode is on; `fix` adds a caller-specific way out."""
    from huggingface_hub import HfApi, is_offline_mode

    if is_offline_mode():
        raise PushError(
            "the Hub cannot be reached: offline mode is on (HF_HUB_OFFLINE=1). Nothing was changed. Fix: unset "
            f"HF_HUB_OFFLINE on a machine with network access{fix}."
        )
    return HfApi(token=token)


def repo_id_problem(value: str, namespaced: bool = True) -> str | None:
    """Why `value` is not a Hub repository id ('namespace/name', or a bare namespace), or None when it is one."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if namespaced and value.count("/") != 1:
        return "not of the form 'namespace/name'."
    if not namespaced and "/" in value:
        return "a namespace is a user or organisation name, without '/'."
    try:
        validate_repo_id(value)
    except HFValidationError as error:
        return f"not a valid Hub id ({error})."
    return None


def hub_call(what: str, token: str | None, function, /, *args, **kwargs):
    """Runs one Hub request; any failure (network, offline mode, auth) becomes one line without the token."""
    try:
        return function(*args, **kwargs)
    except Exception as error:  # noqa: BLE001 - every Hub failure gets the same one-line report
        from huggingface_hub import get_token

        message = (str(error).strip().splitlines() or [""])[0]
        secret = token or get_token()
        if secret:
            message = message.replace(secret, "***")
        raise PushError(
            f"{what} failed: {type(error).__name__}: {message}. Nothing local was changed. Fix: check network "
            "access to huggingface.co (HF_HUB_OFFLINE must be unset) and that the token has write access."
        ) from None


def push_dataset(api, folder: str | Path, repo_id: str, *, private: bool = False, token: str | None = None) -> str:
    """Pushes a `build` output folder (only read) to the dataset repository `repo_id`; returns a one-line summary.

    With `api=None` nothing is sent: the folder is checked and described (push_to_hub.py's --dry_run)."""
    import datasets

    if problem := repo_id_problem(str(repo_id)):
        raise PushError(
            f"dataset repository {repo_id!r}: {problem} Expected e.g. user/riscm-captions. Nothing was sent."
        )
    folder = Path(folder)
    missing = [name for name in ("dataset_dict.json", "README.md") if not (folder / name).is_file()]
    if missing:
        raise PushError(
            f"{folder}: not a dataset_builder output (no {', '.join(missing)}). Expected the --output folder of "
            "`python -m dataset_builder build`. Fix: build it first, or check the path."
        )
    pairs = datasets.load_from_disk(str(folder))
    grouped = datasets.load_from_disk(str(folder / "grouped")) if (folder / "grouped").is_dir() else None
    summary = ", ".join(f"{name}: {len(split):,} rows" for name, split in pairs.items())
    if api is None:
        return f"dataset {folder} -> {repo_id} ({summary}; grouped config: {grouped is not None})"
    url = hub_call(
        f"create_repo {repo_id}", token, api.create_repo, repo_id, repo_type="dataset", private=private, exist_ok=True
    )
    # The card goes first: push_to_hub then merges its dataset_info/configs metadata into it.
    hub_call(
        f"upload card to {repo_id}",
        token,
        api.upload_file,
        path_or_fileobj=str(folder / "README.md"),
        path_in_repo="README.md",
        repo_id=repo_id,
        repo_type="dataset",
        commit_message="dataset card",
    )
    hub_call(f"push {repo_id}", token, pairs.push_to_hub, repo_id, token=token, private=private)
    if grouped is not None:
        hub_call(
            f"push {repo_id} (grouped)",
            token,
            grouped.push_to_hub,
            repo_id,
            config_name="grouped",
            set_default=False,
            token=token,
            private=private,
        )
    return f"dataset {repo_id}: {url} ({summary})"
