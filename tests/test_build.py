"""Building the C core: a missing system header gets a message that names the package."""
import importlib.util
import pathlib

import pytest

# The builder is a build-time file: load it from the source tree (the installed copy has no csrc/ beside it).
_SRC = pathlib.Path(__file__).resolve().parent.parent / "blocksnap" / "_build.py"
_spec = importlib.util.spec_from_file_location("blocksnap_build_under_test", _SRC)
_build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_build)


def test_missing_headers_name_the_packages(tmp_path):
    """Without xxhash.h and zstd.h the build stops and says to install libxxhash-dev and libzstd-dev."""
    with pytest.raises(SystemExit) as exc:
        _build.check_headers([str(tmp_path)])
    assert "libxxhash-dev" in str(exc.value.code) and "libzstd-dev" in str(exc.value.code)


def test_one_missing_header_names_only_its_package(tmp_path):
    """With xxhash.h present, only libzstd-dev is named."""
    (tmp_path / "xxhash.h").write_text("/* stand-in */\n")
    with pytest.raises(SystemExit) as exc:
        _build.check_headers([str(tmp_path)])
    assert "libzstd-dev" in str(exc.value.code) and "libxxhash-dev" not in str(exc.value.code)


def test_present_headers_pass(tmp_path):
    """A directory holding every header satisfies the check."""
    (tmp_path / "xxhash.h").write_text("/* stand-in */\n")
    (tmp_path / "zstd.h").write_text("/* stand-in */\n")
    (tmp_path / "zlib.h").write_text("/* stand-in */\n")
    _build.check_headers([str(tmp_path)])


def test_cdef_comes_from_the_header():
    """The cffi declarations are read from csrc/blocksnap.h, not kept as a copy."""
    cdef = _build._cdef()
    for name in ("bs_scan", "bs_hash128", "bs_is_zero", "bs_punch_hole", "bs_pwrite_sparse", "bs_encode_chunks",
                 "bs_decode", "BS_ABI_VERSION"):
        assert name in cdef
