"""The ``model.pt`` format, written and read here: ``save_model_file`` and ``models.load``.

``model.pt`` is written by :func:`save_model_file` at the end of a run (``callbacks.RunRecorder``)
and by ``resnet-cluster models import``: ``{"format", "arch", "model_options", "state_dict",
"config", "summary"}``. Readers check ``format`` (:func:`check_format`) and refuse a version they
do not know. A Ray Train checkpoint's ``train_state.pt`` (``{"model", "config", ...}``) loads
too, so an unfinished run can be inspected.
"""

from __future__ import annotations

import io
import os
from typing import Any

import torch
from torch import nn

from resnet_cluster.artifacts.layout import MODEL as MODEL_FILE
from resnet_cluster.config import JobConfig
from resnet_cluster.errors import StoreError

MODEL_FORMAT = 1  # bump when the document changes; readers refuse formats they do not know


def save_model_file(path: str, model: nn.Module, cfg: JobConfig, summary: dict[str, Any]) -> None:
    """``model.pt``: the final weights plus what is needed to rebuild the module."""
    torch.save(
        {
            "format": MODEL_FORMAT,
            "arch": cfg.model.arch,
            # every ``model`` key but ``arch`` goes to the builder (as engine.loop.model_options)
            "model_options": cfg.model.model_dump(exclude={"arch"}),
            "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "config": cfg.to_dict(),
            "summary": summary,
        },
        path,
    )


def check_format(doc: dict[str, Any], where: str) -> None:
    """Refuse a ``model.pt`` written in a format this version cannot read (a newer one)."""
    fmt = doc.get("format", MODEL_FORMAT)
    if fmt != MODEL_FORMAT:
        raise StoreError(
            f"{where} is a model.pt of format {fmt!r}; this version of resnet-cluster reads format "
            f"{MODEL_FORMAT}. Load it with the resnet-cluster version that wrote it, or re-export it "
            "with `resnet-cluster models import`."
        )


def _read(path_or_run: str, store: str | None) -> tuple[bytes, str]:
    """The bytes of the file ``path_or_run`` names, and a description for error messages."""
    from resnet_cluster.artifacts.store import ArtifactStore

    p = os.fspath(path_or_run)
    if "://" not in p:
        local = os.path.expanduser(p)
        if os.path.isdir(local):  # a run folder
            local = os.path.join(local, MODEL_FILE)
        if os.path.isfile(local):
            with open(local, "rb") as f:
                return f.read(), local
        if os.sep in p or p.endswith(".pt"):
            raise StoreError(
                f"{p} does not exist. Pass a model.pt file, a run folder, a run URI "
                "(s3://bucket/prefix/runs/<run_id>) or a run id in the store."
            )
        # A bare run id, in the given store or $RESNET_CLUSTER_STORE / ./runs-store.
        from resnet_cluster.config import default_store

        st = ArtifactStore(store or default_store())
        if not st.exists(p, MODEL_FILE):
            where = st.uri(p) if _valid_run_id(p) else st.root
            raise StoreError(
                f"no {MODEL_FILE} for run {p!r} in the store {st.root} (looked at {where}). "
                "Check the run id with `resnet-cluster runs list` (a run that has not finished "
                "has no model.pt yet; pass one of its checkpoints/epoch_*/train_state.pt "
                "instead), or pass --store / set RESNET_CLUSTER_STORE."
            )
        return st.read_bytes(p, MODEL_FILE), st.uri(p, MODEL_FILE)
    # A URI: a file, or a run folder <root>/runs/<run_id>.
    import fsspec

    uri = p.rstrip("/")
    if not uri.endswith(".pt"):
        uri = f"{uri}/{MODEL_FILE}"
    try:
        with fsspec.open(uri, "rb") as f:
            return f.read(), uri
    except FileNotFoundError:
        raise StoreError(
            f"{uri} does not exist. Pass the URI of a model.pt or of a run folder "
            "(<store>/runs/<run_id>)."
        ) from None
    except Exception as e:  # credentials, unknown protocol, network
        raise StoreError(f"could not read {uri} ({type(e).__name__}: {e}).") from None


def _valid_run_id(text: str) -> bool:
    from resnet_cluster.artifacts import layout

    try:
        layout.validate_run_id(text)
    except Exception:
        return False
    return True


def read_model_file(path_or_run: str, *, store: str | None = None) -> dict[str, Any]:
    """The saved document, normalised to ``{"arch", "model_options", "state_dict", "config", ...}``."""
    blob, where = _read(path_or_run, store)
    try:
        doc = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=False)
    except Exception as e:
        raise StoreError(
            f"{where} is not a readable PyTorch file ({type(e).__name__}: {e}). Pass a model.pt "
            "written by a run or by `resnet-cluster models import`."
        ) from None
    if isinstance(doc, dict) and "model" in doc and "config" in doc and "state_dict" not in doc:
        cfg = doc["config"]  # a checkpoint's TrainState
        opts = {k: v for k, v in cfg["model"].items() if k != "arch"}
        doc = {"arch": cfg["model"]["arch"], "model_options": opts, "state_dict": doc["model"],
               "config": cfg, "summary": {"checkpoint_epoch": doc.get("epoch")}}  # fmt: skip
    if isinstance(doc, dict) and "state_dict" in doc:
        check_format(doc, where)
    if not isinstance(doc, dict) or not {"arch", "model_options", "state_dict"} <= set(doc):
        raise StoreError(
            f"{where} is not a model file: it lacks arch/model_options/state_dict. Pass a "
            "model.pt written by a run or by `resnet-cluster models import`, or a checkpoint's "
            "train_state.pt."
        )
    doc["source"] = where
    return doc


def load(path_or_run: str | os.PathLike[str], *, store: str | None = None) -> nn.Module:
    """Rebuild the net saved in ``path_or_run`` with its weights, in eval mode, on the CPU.

    ``path_or_run``: a ``model.pt`` (local path or fsspec URI), a run folder or run URI
    (``<store>/runs/<run_id>``), a bare run id (looked up in ``store``, default
    ``$RESNET_CLUSTER_STORE`` or ``./runs-store``), or a checkpoint's ``train_state.pt``.
    """
    from resnet_cluster.models.registry import build

    doc = read_model_file(os.fspath(path_or_run), store=store)
    net = build(doc["arch"], **doc["model_options"])
    try:
        net.load_state_dict(doc["state_dict"])
    except RuntimeError as e:
        raise StoreError(
            f"{doc['source']}: the weights do not fit {doc['arch']} with options "
            f"{doc['model_options']} ({str(e).splitlines()[0]} ...)."
        ) from None
    return net.eval()
