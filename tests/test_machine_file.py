"""What a machine file records about its calibration (hpcnn.strategy.machine):
the cost-model version its figures are meant for, the layout its links were
measured on, and the one-line warning a job gets when either does not fit."""
import json

import pytest

from hpcnn.strategy.machine import (COST_MODEL_VERSION, MachineError, block_layout, even_layout, load_machine,
                                    stale_warning)


def cluster_file(tmp_path, **changes):
    """The shipped local machine as `hpcnn calibrate --cluster` would record
    it on 2 nodes x 2 ranks, with ``changes`` to its JSON."""
    d = load_machine("local").to_dict()
    d.update(nodes=2, ranks_per_node=2, hosts=["labn0", "labn1"], cost_model_version=COST_MODEL_VERSION)
    d.update(changes)
    p = tmp_path / "cluster.json"
    p.write_text(json.dumps(d))
    return p


def test_every_shipped_machine_file_is_for_this_cost_model():
    """A machine file shipped in hpcnn/machines/ was calibrated (or, for a
    datasheet description, written) for the current cost model: when the
    model changes what a figure means (COST_MODEL_VERSION), the shipped
    files must be recalibrated with it (hpcnn calibrate)."""
    from hpcnn.strategy.machine import MACHINES_DIR
    assert isinstance(COST_MODEL_VERSION, int) and COST_MODEL_VERSION >= 3
    shipped = sorted(MACHINES_DIR.glob("*.json"))
    assert {p.stem for p in shipped} >= {"local", "paper_p100_cluster"}
    for path in shipped:
        m = load_machine(path)
        assert m.cost_model_version == COST_MODEL_VERSION, (
            f"{path.name} was written for cost-model version {m.cost_model_version}, this hpcnn's is "
            f"{COST_MODEL_VERSION}: recalibrate it (hpcnn calibrate -o {path})")
        assert stale_warning(m, [1]) is None, path.name


def test_files_without_a_version_are_version_1(tmp_path):
    d = load_machine("paper_p100_cluster").to_dict()
    del d["cost_model_version"]
    p = tmp_path / "old.json"
    p.write_text(json.dumps(d))
    assert load_machine(p).cost_model_version == 1
    assert "written for cost-model version 1" in stale_warning(load_machine(p), [1])


def test_version_and_hosts_survive_a_save_and_load(tmp_path):
    m = load_machine(cluster_file(tmp_path))
    assert (m.nodes, m.ranks_per_node, m.hosts, m.cost_model_version) == (2, 2, ["labn0", "labn1"],
                                                                          COST_MODEL_VERSION)
    m.save(tmp_path / "again.json")
    d = json.loads((tmp_path / "again.json").read_text())
    assert d["cost_model_version"] == COST_MODEL_VERSION and d["hosts"] == ["labn0", "labn1"]
    assert load_machine(tmp_path / "again.json").hosts == ["labn0", "labn1"]


@pytest.mark.parametrize("bad,match", [({"cost_model_version": "2"}, "cost_model_version must be a positive"),
                                       ({"cost_model_version": 0}, "cost_model_version must be a positive"),
                                       ({"hosts": "labn0"}, "hosts must be a list")])
def test_malformed_records_name_the_key(tmp_path, bad, match):
    with pytest.raises(MachineError, match=match):
        load_machine(cluster_file(tmp_path, **bad))


def test_layouts_of_ranks_on_nodes():
    assert block_layout(5, 2) == [2, 2, 1] and block_layout(4, 256) == [4]
    assert even_layout(5, 2) == [3, 2] and even_layout(4, 1) == [4]


def test_warning_names_what_differs_and_what_to_do(tmp_path):
    m = load_machine(cluster_file(tmp_path))
    assert stale_warning(m, [2, 2]) is None                  # the calibrated layout
    assert stale_warning(m, None) is None                    # layout unknown, version current
    w = stale_warning(m, [4])
    assert w.startswith("hpcnn: warning: machine file ") and "\n" not in w
    assert "calibrated on 2 nodes x 2 ranks (labn0, labn1), this job runs on 1 node x 4 ranks" in w
    assert "re-run hpcnn calibrate with the job's layout" in w
    assert "this job runs on 2 nodes with 3, 2 ranks" in stale_warning(m, [3, 2])
    assert "this job runs on 3 nodes x 2 ranks" in stale_warning(m, [2, 2, 2])
    # an older cost model, with or without a layout to compare
    old = load_machine(cluster_file(tmp_path, cost_model_version=1))
    w = stale_warning(old, [2, 2])
    assert f"written for cost-model version 1, older than this hpcnn's {COST_MODEL_VERSION}" in w
    assert "calibrated on" not in w and "re-run hpcnn calibrate to measure it again" in w
    both = stale_warning(old, [1, 1])
    assert "calibrated on 2 nodes x 2 ranks" in both and "cost-model version 1" in both
    newer = load_machine(cluster_file(tmp_path, cost_model_version=COST_MODEL_VERSION + 1))
    assert "by a newer hpcnn" in stale_warning(newer, [2, 2])


def test_a_file_calibrated_on_one_node_fits_any_ranks_on_one_node(tmp_path):
    one = load_machine(cluster_file(tmp_path, nodes=1, ranks_per_node=256, hosts=["vm"]))
    assert stale_warning(one, [4]) is None and stale_warning(one, [1]) is None
    w = stale_warning(one, [2, 2])
    assert "calibrated on 1 node (vm; links.inter_node not measured), this job runs on 2 nodes x 2 ranks" in w
    # the shipped local file records the one node it was calibrated on; the
    # paper's cluster (a datasheet, no hosts) is judged by its version only
    assert "calibrated on 1 node" in stale_warning(load_machine("local"), [2, 2])
    assert stale_warning(load_machine("paper_p100_cluster"), [2, 2]) is None
