"""push_to_hub(model, repo_id): publish a quantized model as one commit, with its model card.

The unified checkpoint is written into a temporary directory (the same files `save_pretrained`
writes), the tokenizer and the model card beside it; then `create_repo(exist_ok=True)` and ONE
`HfApi.create_commit` that adds every file and deletes the checkpoint files the repository holds
but the new checkpoint does not (e.g. the shards of an earlier push with a different shard count).
Files that are not part of a checkpoint (.gitattributes, images, notes) are left alone. Public
as `hf_ptq_plugin.push_to_hub`, and as the CLI's `push` and `quantize --push_to_hub`.
"""

import fnmatch
import logging
import tempfile
from pathlib import Path
from typing import List, Optional

from huggingface_hub import CommitInfo, CommitOperationAdd, CommitOperationDelete, HfApi
from torch import nn

from . import export_checkpoint
from .atomic import STALE_PATTERNS
from .model_card import EvaluationRecord, warn_if_local_base_model
from .save import SIDECAR_PATTERNS, ptq_config_of

logger = logging.getLogger(__name__)

# Files a checkpoint push owns: a remote file matching these that the new push lacks is stale.
CHECKPOINT_PATTERNS = STALE_PATTERNS + SIDECAR_PATTERNS + ("config.json", "generation_config.json", "*.safetensors",
                                                           "*.bin", "*.index.json")


def push_to_hub(model: nn.Module, repo_id: str, tokenizer=None, private: Optional[bool] = None,
                token: Optional[str] = None, commit_message: Optional[str] = None, revision: Optional[str] = None,
                create_pr: bool = False, base_model: Optional[str] = None,
                evaluation: Optional[EvaluationRecord] = None, endpoint: Optional[str] = None,
                **save_kwargs) -> CommitInfo:
    """Push `model` (quantized by hf_ptq_plugin) to `repo_id` in one commit; returns the commit info.

    `private` applies when the repo is created; `revision` is the branch to commit to (created
    from main if missing); `create_pr` opens a pull request instead of committing to the branch.
    `base_model` / `evaluation` go into the model card (see `model_card.render_model_card`);
    `endpoint` selects another Hub; `save_kwargs` go to save_pretrained (e.g. `max_shard_size`).
    """
    config = ptq_config_of(model)  # refuses a model we did not quantize before any network call
    warn_if_local_base_model(model, base_model)
    api = HfApi(endpoint=endpoint, token=token)
    with tempfile.TemporaryDirectory(prefix="hf-ptq-push-") as tmp:
        folder = Path(tmp) / "checkpoint"
        export_checkpoint(model, folder, tokenizer=tokenizer, base_model=base_model, evaluation=evaluation,
                          model_id=repo_id, **save_kwargs)
        api.create_repo(repo_id, private=private, exist_ok=True)
        if revision not in (None, "main"):
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        local = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
        stale = stale_files(api.list_repo_files(repo_id, revision=revision), local)
        operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(folder / name)) for name in local]
        operations += [CommitOperationDelete(path_in_repo=name) for name in stale]
        message = commit_message or f"Upload {config.qformat} checkpoint (hf-ptq-plugin)"
        info = api.create_commit(repo_id, operations, commit_message=message, revision=revision, create_pr=create_pr)
    logger.info("pushed %d files (%d stale deleted) to %s: %s", len(local), len(stale), repo_id,
                info.pr_url or info.commit_url)
    return info


def stale_files(remote: List[str], local: List[str]) -> List[str]:
    """Remote checkpoint files (weights, configs, tokenizer files) that the new checkpoint does not have."""
    keep = set(local)
    return sorted(name for name in remote if name not in keep and "/" not in name
                  and any(fnmatch.fnmatch(name, pattern) for pattern in CHECKPOINT_PATTERNS))
