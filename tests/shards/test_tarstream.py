"""shards.tarstream: the fast member reader agrees with Python's tarfile, and refuses bad files."""
from __future__ import annotations

import io
import os
import tarfile

import pytest

from shards.tarstream import TarFormatError, iter_tar_members


def write_tar(path, members, fmt=tarfile.USTAR_FORMAT, directory=None):
    with tarfile.open(path, "w", format=fmt) as tar:
        if directory:
            info = tarfile.TarInfo(directory)
            info.type = tarfile.DIRTYPE
            tar.addfile(info)
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("link.jpg")
        link.type, link.linkname = tarfile.SYMTYPE, members[0][0]
        tar.addfile(link)


def tarfile_members(path):
    with tarfile.open(path) as tar:
        return [(info.name, tar.extractfile(info).read()) for info in tar if info.isfile()]


MEMBERS = [
    ("000000.jpg", os.urandom(5000)),
    ("000000.json", b'{"key": "000000"}'),
    ("000000.tgt.npy", os.urandom(512 * 3)),      # a whole number of blocks: no padding
    ("000001.jpg", b""),                           # empty member
    ("000001.txt", "caption with ünïcode".encode()),
]


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_reads_what_tarfile_reads(tmp_path, fmt):
    long_name = "d" * 120 + "/000002.jpg"  # prefix field in ustar, long-name header in GNU, pax path
    members = MEMBERS + [(long_name, b"x" * 700)]
    if fmt == tarfile.PAX_FORMAT:
        members.append(("ünïcode/000003.jpg", b"y" * 10))
    path = tmp_path / "a.tar"
    write_tar(path, members, fmt, directory="somedir")
    got = list(iter_tar_members(path))
    assert got == tarfile_members(path) == members


def test_empty_archive_and_missing_end_blocks(tmp_path):
    empty = tmp_path / "empty.tar"
    tarfile.open(empty, "w").close()
    assert list(iter_tar_members(empty)) == []
    # an archive cut exactly after a member (no end-of-archive blocks) still yields its members
    whole = tmp_path / "whole.tar"
    write_tar(whole, MEMBERS[:1])
    cut = tmp_path / "cut.tar"
    cut.write_bytes(whole.read_bytes()[: 512 + 5120])
    assert list(iter_tar_members(cut)) == MEMBERS[:1]


def test_truncated_member_is_an_error_naming_the_file(tmp_path):
    whole = tmp_path / "whole.tar"
    write_tar(whole, MEMBERS)
    cut = tmp_path / "cut.tar"
    cut.write_bytes(whole.read_bytes()[:3000])
    with pytest.raises(TarFormatError, match=r"cut\.tar: member at byte 0 is truncated"):
        list(iter_tar_members(cut))


def test_corrupt_header_and_non_tar_files_are_refused(tmp_path):
    whole = tmp_path / "whole.tar"
    write_tar(whole, MEMBERS)
    data = bytearray(whole.read_bytes())
    data[0] ^= 0x01  # flip a bit of the first member's name
    corrupt = tmp_path / "corrupt.tar"
    corrupt.write_bytes(bytes(data))
    with pytest.raises(TarFormatError, match=r"corrupt\.tar: bad header checksum at byte 0"):
        list(iter_tar_members(corrupt))
    not_tar = tmp_path / "image.tar"
    not_tar.write_bytes(os.urandom(2048))
    with pytest.raises(TarFormatError, match=r"image\.tar"):
        list(iter_tar_members(not_tar))


def test_views_without_copies_outlive_the_reader(tmp_path):
    path = tmp_path / "a.tar"
    write_tar(path, MEMBERS)
    views = list(iter_tar_members(path, copy=False))
    assert all(isinstance(data, memoryview) and data.readonly for _, data in views)
    assert [(name, bytes(data)) for name, data in views] == MEMBERS
    reader = iter_tar_members(path, copy=False)
    name, first = next(reader)
    reader.close()  # an abandoned reader: its views stay readable
    assert (name, bytes(first)) == MEMBERS[0]


def test_a_device_or_pipe_is_not_read_as_an_empty_archive():
    with pytest.raises(TarFormatError, match="/dev/null: not a regular file"):
        list(iter_tar_members("/dev/null"))
