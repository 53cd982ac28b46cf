"""Run artifacts: the store (local folder or s3://), the run layout, provenance, manifest and
registry. See ARCHITECTURE.md, "A run in the artifact store"."""

from resnet_cluster.artifacts import layout
from resnet_cluster.artifacts.layout import validate_run_id
from resnet_cluster.artifacts.manifest import verify_manifest, write_manifest
from resnet_cluster.artifacts.provenance import environment_snapshot, git_provenance, redact
from resnet_cluster.artifacts.registry import RunRecord, list_runs, show_run
from resnet_cluster.artifacts.run import CsvLog, RunWriter
from resnet_cluster.artifacts.store import ArtifactStore

__all__ = [
    "ArtifactStore",
    "CsvLog",
    "RunRecord",
    "RunWriter",
    "environment_snapshot",
    "git_provenance",
    "layout",
    "list_runs",
    "redact",
    "show_run",
    "validate_run_id",
    "verify_manifest",
    "write_manifest",
]
