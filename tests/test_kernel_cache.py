"""Compiled kernels survive a restart in a read-only install when NUMBA_CACHE_DIR names a writable folder.

numba needs a writable cache folder even to load from it. A container image runs the installed package as a
non-root user, so its ``__pycache__`` is read-only: without ``NUMBA_CACHE_DIR`` every start compiles every
kernel again (~12 s on 2 cores). The package here sits on a read-only bind mount in a private mount namespace
(``unshare``), which even root cannot write to.
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

KERNEL = textwrap.dedent('''
    from loader_service._numba_jit import eager_jit

    @eager_jit("int64(int64)")
    def twice(x):
        return 2 * x
''')

PROBE = textwrap.dedent('''
    import json, sys
    sys.path.insert(0, sys.argv[1])
    import tinykernel
    from loader_service._numba_jit import uncached_kernels
    print(json.dumps({"value": tinykernel.twice(21), "uncached": uncached_kernels(),
                      "hits": sum(tinykernel.twice.stats.cache_hits.values())}))
''')


def probe(package: Path, env: dict[str, str]) -> dict[str, object]:
    where = shlex.quote(str(package))
    script = (f"mount --bind {where} {where} && mount -o remount,bind,ro {where} && "
              f"exec {shlex.join([sys.executable, '-c', PROBE, str(package)])}")
    out = subprocess.run(["unshare", "--mount", "sh", "-c", script], capture_output=True, text=True, timeout=300,
                         cwd=ROOT, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), **env})
    if out.returncode != 0 and "unshare" in out.stderr and ("Operation not permitted" in out.stderr
                                                          or "permission denied" in out.stderr.lower()):
        pytest.skip("this sandbox does not allow mount namespaces")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare(1) for a read-only bind mount")
def test_kernels_are_cached_outside_a_read_only_install(tmp_path: Path) -> None:
    package = tmp_path / "site"
    package.mkdir()
    (package / "tinykernel.py").write_text(KERNEL)
    home = str(package / "home")  # on the read-only mount too: numba's per-user cache cannot be made there

    unset = probe(package, {"HOME": home})
    assert unset["value"] == 42
    assert len(unset["uncached"]) == 1 and "tinykernel.twice" in unset["uncached"][0]  # type: ignore[index, arg-type]

    cache = tmp_path / "numba-cache"
    first = probe(package, {"HOME": home, "NUMBA_CACHE_DIR": str(cache)})
    second = probe(package, {"HOME": home, "NUMBA_CACHE_DIR": str(cache)})
    assert first["uncached"] == [] and first["hits"] == 0  # compiled, and written to the cache
    assert any(cache.rglob("*.nbi"))
    assert second["uncached"] == [] and second["hits"] == 1 and second["value"] == 42  # loaded, not compiled
