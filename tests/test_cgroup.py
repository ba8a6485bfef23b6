"""The memory plan inside cgroups that hold page cache.

A cgroup's usage (v2 memory.current, v1 memory.usage_in_bytes) counts the file pages charged to it:
our model's and whatever ran in the cgroup before. The kernel reclaims those within the limit instead of
killing anything, so the plan takes from the limit only the rest (memory.stat: usage less active_file and
inactive_file), and still refuses when the anonymous buffers do not fit. The machines are fixture folders
under tests/fixtures/sysroot (512 GiB, no NUMA folders unless said), the model the DeepSeek-R1 header of
tests/test_plan.py (377 GiB of weights, about 2 GiB of buffers at --ctx 4096).
"""

import json
import shutil
from pathlib import Path

import pytest
from test_plan import deepseek_r1  # noqa: F401  (the session fixture: a 9-split R1 header over sparse files)

from refengine.cli import main
from refengine.gguf import open_gguf
from refengine.plan import plan, size
from refengine.system import SystemReadError, read_system

FIXTURES = Path(__file__).parent / "fixtures" / "sysroot"
GIB = 1 << 30
SERVICE = "/sys/fs/cgroup/system.slice/refengine.service"


def machine(name: str):
    return read_system(FIXTURES / name)


def stat_fields(name: str, relative: str) -> dict[str, int]:
    """A fixture's memory.stat as the kernel wrote it, parsed here on its own: the oracle for file_pages."""
    lines = (FIXTURES / name / relative).read_text().splitlines()
    return {key: int(value) for key, value in (line.split() for line in lines)}


@pytest.mark.parametrize(
    "name, limit_file", [("cgroup_v2_page_cache", "memory.max"), ("cgroup_v2_high_page_cache", "memory.high")]
)
def test_file_pages_charged_to_the_cgroup_are_room_not_taken(deepseek_r1, name, limit_file):  # noqa: F811
    """memory.max (or memory.high) 450 GiB, memory.current 420 GiB, almost all of it file pages: R1 fits."""
    system = machine(name)
    stat = stat_fields(name, "sys/fs/cgroup/system.slice/refengine.service/memory.stat")
    c = system.cgroup
    assert (c.version, c.file, c.limit, c.usage) == (2, f"{SERVICE}/{limit_file}", 450 * GIB, 420 * GIB)
    assert c.file_pages == stat["active_file"] + stat["inactive_file"]  # shmem, though in "file", is not reclaimable
    assert c.taken == c.usage - c.file_pages and c.room == c.limit - c.taken
    p = plan(open_gguf(deepseek_r1[0]), system, n_ctx=4096)
    assert p.verdict == "fits", p.message()
    assert p.room.limiter == "cgroup" and p.room.bytes == c.room
    # Read as taken, the usage would leave 30 GiB: a plan that did that would refuse a model that runs.
    assert p.needs.weights_total + p.needs.anon > c.limit - c.usage


def test_cgroup_v1_usage_and_hierarchical_file_pages(deepseek_r1):  # noqa: F811
    system = machine("cgroup_v1_page_cache")
    stat = stat_fields("cgroup_v1_page_cache", "sys/fs/cgroup/memory/docker/3f2a/memory.stat")
    c = system.cgroup
    assert c.version == 1 and c.file.endswith("/docker/3f2a/memory.limit_in_bytes")
    assert (c.limit, c.usage) == (450 * GIB, 420 * GIB)
    assert c.file_pages == stat["total_active_file"] + stat["total_inactive_file"]
    assert plan(open_gguf(deepseek_r1[0]), system, n_ctx=4096).verdict == "fits"


def test_anonymous_usage_is_taken(deepseek_r1):  # noqa: F811
    """The same limit and usage, but 400 GiB of it anonymous: 50 GiB of room, and the weights do not fit."""
    system = machine("cgroup_v2_anon")
    assert system.cgroup.taken > 400 * GIB
    p = plan(open_gguf(deepseek_r1[0]), system, n_ctx=4096)
    assert p.verdict == "does_not_fit"
    message = p.message()
    assert f"{SERVICE}/memory.max" in message and f"{size(system.cgroup.taken)} is taken" in message, message
    assert "the weights need 377 GiB" in message and "MemoryMax" in message


@pytest.mark.parametrize(
    "name, limit_file", [("cgroup_v2_small", "memory.max"), ("cgroup_v2_high_small", "memory.high")]
)
def test_buffers_above_the_limit_do_not_fit_and_name_its_file(deepseek_r1, name, limit_file):  # noqa: F811
    """A limit of 1.5 GiB holding 1 GiB of file pages: room for the weights' pages to come and go, none for
    the KV cache and activations, whatever file pages the kernel could drop."""
    system = machine(name)
    p = plan(open_gguf(deepseek_r1[0]), system, n_ctx=4096)
    assert system.cgroup.room <= system.cgroup.limit < p.needs.anon  # the fixture is the case it tests
    assert p.verdict == "does_not_fit"
    assert f"{SERVICE}/{limit_file}" in p.message() and "KV cache at --ctx 4096" in p.message(), p.message()
    assert any("raise the cgroup memory limit" in action for action in p.actions)


def test_the_tightest_of_max_and_high_at_every_level(tmp_path, deepseek_r1):  # noqa: F811
    """memory.high below memory.max binds; so does an ancestor's limit whose own usage leaves less room."""
    root = shutil.copytree(FIXTURES / "cgroup_v2_page_cache", tmp_path / "root")
    service = root / SERVICE.lstrip("/")
    (service / "memory.high").write_text(f"{440 * GIB}\n")
    assert read_system(root).cgroup.file == f"{SERVICE}/memory.high"
    parent = service.parent
    (parent / "memory.max").write_text(f"{500 * GIB}\n")
    (parent / "memory.current").write_text(f"{490 * GIB}\n")  # the slice's other services hold 70 GiB ...
    (parent / "memory.stat").write_text(f"anon {74 * GIB}\nactive_file {200 * GIB}\ninactive_file {216 * GIB}\n")
    c = read_system(root).cgroup  # ... of anonymous memory: 426 GiB of room in the slice, 436 GiB in the service
    assert c.file == "/sys/fs/cgroup/system.slice/memory.max" and c.room == 500 * GIB - 74 * GIB
    p = plan(open_gguf(deepseek_r1[0]), read_system(root), n_ctx=4096)
    assert p.verdict == "fits" and p.room.bytes == c.room


def test_malformed_memory_stat_is_one_line_naming_it(tmp_path):
    root = shutil.copytree(FIXTURES / "cgroup_v2_page_cache", tmp_path / "root")
    stat = root / SERVICE.lstrip("/") / "memory.stat"
    stat.write_text("anon 1\nactive_file lots\n")
    with pytest.raises(SystemReadError) as raised:
        read_system(root)
    assert str(stat) in str(raised.value) and "\n" not in str(raised.value)


def test_missing_stat_counts_the_whole_usage_as_reclaimable_only_when_known(tmp_path):
    """Without memory.stat the file pages are unknown: nothing of the usage is subtracted as reclaimable."""
    root = shutil.copytree(FIXTURES / "cgroup_v2_page_cache", tmp_path / "root")
    (root / SERVICE.lstrip("/") / "memory.stat").unlink()
    c = read_system(root).cgroup
    assert c.file_pages is None and c.taken == c.usage and c.room == 30 * GIB


def test_cli_plan_json_reports_the_cgroup(capsys, deepseek_r1):  # noqa: F811
    code = main(["plan", str(deepseek_r1[0]), "--json", "--sysroot", str(FIXTURES / "cgroup_v2_small")])
    out, err = capsys.readouterr()
    assert code == 0, err
    result = json.loads(out)
    assert result["verdict"] == "does_not_fit" and result["room"]["limited_by"] == "cgroup"
    cgroup = result["system"]["cgroup"]
    assert cgroup["file"] == f"{SERVICE}/memory.max" and cgroup["usage"] == GIB
    assert cgroup["taken"] == cgroup["usage"] - cgroup["file_pages"]
    main(["plan", str(deepseek_r1[0]), "--sysroot", str(FIXTURES / "cgroup_v2_page_cache")])
    text, _ = capsys.readouterr()
    assert "verdict: fits" in text and "420 GiB used" in text
