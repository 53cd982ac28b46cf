"""launch/ray_compat.py and artifacts/fs_compat.py: the private Ray and fsspec names they use
exist in the installed versions, and another version falls back to the libraries' own behaviour.
No Ray cluster is started."""

from __future__ import annotations

import signal

import fsspec
import pytest

from resnet_cluster.artifacts import fs_compat
from resnet_cluster.launch import ray_compat


def test_installed_ray_is_the_tested_one():
    # the workarounds were written for this Ray; a new pin must re-check docs/ray-notes.md
    assert ray_compat.tested()
    assert ray_compat.tested("2.60.3") and not ray_compat.tested("2.61.0") and not ray_compat.tested("3.0")


def test_trainer_still_has_the_private_sigint_hook():
    from ray.train.torch import TorchTrainer

    assert callable(getattr(TorchTrainer, "_register_sigint_handler", None))


class FakeTrainer:
    def _register_sigint_handler(self, controller):
        raise AssertionError("Ray's own handler must have been replaced")


def test_bound_sigint_abort_replaces_rays_handler_on_the_tested_ray():
    trainer = FakeTrainer()
    before = signal.getsignal(signal.SIGINT)
    try:
        assert ray_compat.bound_sigint_abort(trainer, lambda: None)
        trainer._register_sigint_handler(controller=None)  # what fit() does
        handler = signal.getsignal(signal.SIGINT)
        assert handler is not before and handler.fired is False
    finally:
        signal.signal(signal.SIGINT, before)


def test_bound_sigint_abort_keeps_rays_handler_on_another_ray(caplog):
    trainer = FakeTrainer()
    own = trainer._register_sigint_handler
    assert not ray_compat.bound_sigint_abort(trainer, lambda: None, version="2.61.0")
    assert trainer._register_sigint_handler == own
    assert "2.61.0" in caplog.text and "falls back" in caplog.text


def test_current_cluster_api_present_and_skipped_on_another_ray(caplog):
    assert ray_compat._address_api() is not None  # ray._private.utils/services names still there
    # another version: nothing is written to /tmp/ray (other clusters on this machine use it)
    assert not ray_compat.claim_current_cluster("127.0.0.1:1", version="3.0.0")
    assert "3.0.0" in caplog.text


@pytest.mark.parametrize("proto, uri, path", [
    ("memory", "memory://bucket/runs/a/", "/bucket/runs/a"),
    ("file", "file:///tmp/x/runs", "/tmp/x/runs"),
])  # fmt: skip
def test_strip_protocol_matches_fsspec(proto, uri, path):
    fs = fsspec.filesystem(proto)
    assert fs_compat.tested()
    assert fs_compat.strip_protocol(fs, uri) == fs._strip_protocol(uri) == path


def test_strip_protocol_s3_private_and_fallback_agree():
    s3fs = pytest.importorskip("s3fs")
    fs = s3fs.S3FileSystem(anon=True)
    for uri in ("s3://bucket/runs/a/model.pt", "bucket/runs/a/", "s3a://bucket/k"):
        assert fs_compat.strip_protocol(fs, uri) == fs_compat.strip_protocol(fs, uri, version="2019.1.0")
    assert fs_compat.strip_protocol(fs, "s3://bucket/runs/a/") == "bucket/runs/a"
