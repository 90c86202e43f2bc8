"""Special files in and out: FIFOs, devices, folders, symlinks, full disks, stale temporaries, legacy inputs."""

from __future__ import annotations

import errno
import fcntl
import os
import stat

import pytest
import torch

from kvstore import atomic, snapshot
from kvstore.errors import SnapshotError
from kvstore.legacy import read_legacy
from kvstore.verify import verify
from kvstore_factory import make_state

READERS = {
    "read_info": snapshot.read_info,
    "load": snapshot.load,
    "verify": verify,
    "read_legacy": read_legacy,
}


@pytest.mark.timeout(20)
@pytest.mark.parametrize("reader", list(READERS))
def test_a_fifo_named_like_a_snapshot_is_refused_without_waiting(tmp_path, reader):
    fifo = tmp_path / "x.kvs"
    os.mkfifo(fifo)
    with pytest.raises(SnapshotError, match=f"^{fifo} is a FIFO, not a regular"):
        READERS[reader](fifo)


def test_devices_folders_and_missing_paths_are_refused_in_one_line(tmp_path):
    with pytest.raises(SnapshotError, match="^/dev/zero is a character device, not a regular snapshot file$"):
        snapshot.load("/dev/zero")
    with pytest.raises(SnapshotError, match=f"^{tmp_path} is a folder, not a snapshot file$"):
        snapshot.read_info(tmp_path)
    with pytest.raises(SnapshotError, match=f"^no snapshot at {tmp_path / 'absent.kvs'}$"):
        snapshot.load(tmp_path / "absent.kvs")


def test_a_symlink_to_a_snapshot_reads_like_the_snapshot(tmp_path):
    snapshot.save(make_state(), tmp_path / "real.kvs")
    (tmp_path / "link.kvs").symlink_to(tmp_path / "real.kvs")
    assert snapshot.load(tmp_path / "link.kvs").token_ids == make_state().token_ids


def test_outputs_must_be_regular_files_or_new_paths(tmp_path):
    fifo = tmp_path / "fifo.kvs"
    os.mkfifo(fifo)
    with pytest.raises(SnapshotError, match=f"^cannot write {fifo}: it is a FIFO, and kvtrace writes only regular"):
        snapshot.save(make_state(), fifo)
    assert stat.S_ISFIFO(fifo.lstat().st_mode)
    with pytest.raises(SnapshotError, match=f"^{tmp_path} is a folder; give a file name to write$"):
        snapshot.save(make_state(), tmp_path)
    device = tmp_path / "null"
    try:
        os.mknod(device, stat.S_IFCHR | 0o666, os.makedev(1, 3))  # a /dev/null of our own (needs root)
    except PermissionError:
        return
    link = tmp_path / "to-null.kvs"
    link.symlink_to(device)
    for target in (device, link):
        with pytest.raises(SnapshotError, match="it is a character device"):
            snapshot.save(make_state(), target)
    assert stat.S_ISCHR(device.lstat().st_mode) and link.is_symlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fifo.kvs", "null", "to-null.kvs"]


def test_a_symlink_output_replaces_its_target_and_stays_a_link(tmp_path):
    (tmp_path / "data").mkdir()
    target = tmp_path / "data" / "real.kvs"
    snapshot.save(make_state(seed=1), target)
    link = tmp_path / "latest.kvs"
    link.symlink_to(target)
    snapshot.save(make_state(seed=2), link)
    assert link.is_symlink() and link.resolve() == target
    assert snapshot.load(target).token_ids == make_state(seed=2).token_ids
    dangling = tmp_path / "new.kvs"
    dangling.symlink_to(tmp_path / "data" / "created.kvs")
    snapshot.save(make_state(), dangling)  # as open() would: the link's target is created
    assert dangling.is_symlink() and (tmp_path / "data" / "created.kvs").is_file()


@pytest.mark.parametrize("code, words", [(errno.ENOSPC, "no space left on device"),
                                         (errno.EROFS, "read-only file system"),
                                         (errno.EACCES, "permission denied")])
def test_write_errors_are_one_line_naming_the_path_and_keep_the_old_file(tmp_path, monkeypatch, code, words):
    path = tmp_path / "s.kvs"
    snapshot.save(make_state(seed=1), path)
    before = path.read_bytes()

    def failing_fsync(fd: int) -> None:
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(atomic.os, "fsync", failing_fsync)
    with pytest.raises(SnapshotError, match=f"^cannot write {path}: {words}$"):
        snapshot.save(make_state(seed=2), path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.kvs"]


def test_a_missing_folder_is_named(tmp_path):
    target = tmp_path / "nowhere" / "s.kvs"
    with pytest.raises(SnapshotError, match=f"^cannot write {target}: the folder {target.parent} does not exist$"):
        snapshot.save(make_state(), target)


def test_stale_temporaries_of_the_same_target_are_removed_live_ones_kept(tmp_path):
    stale = tmp_path / ".s.kvs.k2j4_x9a.tmp"
    stale.write_bytes(b"half a snapshot")
    live = tmp_path / ".s.kvs.abcdefgh.tmp"
    live.write_bytes(b"another process is writing this one")
    others = [tmp_path / ".t.kvs.abcdefgh.tmp", tmp_path / ".s.kvs.backup.tmp", tmp_path / ".s.kvs.abcdefgh.tmp.x"]
    for other in others:
        other.write_bytes(b"not ours")
    with open(live, "rb") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)  # as a live writer holds its temporary
        snapshot.save(make_state(), tmp_path / "s.kvs")
    assert not stale.exists() and live.exists() and all(o.exists() for o in others)


def test_legacy_files_of_both_torch_formats_are_read_without_unpickling(tmp_path):
    layers = tuple((torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4)) for _ in range(3))
    torch.save(layers, tmp_path / "zip.pt")
    torch.save(layers, tmp_path / "old.pt", _use_new_zipfile_serialization=False)
    for name in ("zip.pt", "old.pt"):
        cache = read_legacy(tmp_path / name)
        assert len(cache.keys) == 3 and torch.equal(cache.values[2], layers[2][1][0])

    class Evil:
        def __reduce__(self):
            return (os.system, ("true",))

    torch.save({"past_key_values": Evil()}, tmp_path / "evil-old.pt", _use_new_zipfile_serialization=False)
    with pytest.raises(SnapshotError, match="weights_only=True refused it") as error:
        read_legacy(tmp_path / "evil-old.pt")
    assert "\x1b" not in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("layer, bad", [(2, torch.randn(1, 2, 5, 6)), (1, torch.randn(1, 2, 4, 4)),
                                        (2, torch.randn(1, 2, 5, 4, dtype=torch.float64))])
def test_every_legacy_layer_is_checked_not_only_the_first(tmp_path, layer, bad):
    layers = [(torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4)) for _ in range(3)]
    layers[layer] = (layers[layer][0], bad)
    torch.save(tuple(layers), tmp_path / "cache.pt")
    with pytest.raises(SnapshotError, match=f"layer {layer} values are"):
        read_legacy(tmp_path / "cache.pt")
