"""Hardware specs and the virtual machine: the published ATOM figures, and clear errors for bad files."""
from __future__ import annotations

import pytest

from rebel.errors import DeviceError, SpecError
from rebel.npu import (builtin_products, current_machine, device_count, get_npu_name, load_spec,
                       npu_is_available, reset_machine)
from rebel.npu.spec import GiB, MiB, SPEC_DIR

CA12_TEXT = (SPEC_DIR / "rbln-ca12.toml").read_text()


@pytest.fixture(autouse=True)
def clean_machine(monkeypatch):
    """Each test starts from the default environment and leaves no cached machine behind."""
    monkeypatch.delenv("RBLN_VIRTUAL_NPU", raising=False)
    monkeypatch.delenv("RBLN_VIRTUAL_CARDS", raising=False)
    reset_machine()
    yield
    reset_machine()


def write(tmp_path, text, name="spec.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def spec_error(path_or_name) -> str:
    with pytest.raises(SpecError) as info:
        load_spec(path_or_name)
    return str(info.value)


# ---- built-in specs ---------------------------------------------------------------------------

def test_builtin_products():
    assert builtin_products() == ["NVIDIA-H100-SXM", "RBLN-CA12", "RBLN-CA25"]


def test_atom_die_figures():
    spec = load_spec("RBLN-CA12")
    c, m = spec.die.compute, spec.die.memory
    assert spec.family == "ATOM" and spec.dies == 1
    assert c.neural_engines == 8
    assert m.local_sram_bytes == 4 * MiB
    assert m.shared_sram_bytes == 32 * MiB
    assert m.dram_bytes == 16 * GiB
    assert m.dram_usable_bytes == 16 * GiB - 288 * MiB
    assert m.dram_bandwidth == 256e9
    assert c.peak_flops("float16") == 32e12
    assert c.peak_flops("int8") == 128e12
    assert c.peak_flops("int4") == 256e12
    assert "PCIe Gen5 x16" in spec.host_link.name
    assert spec.source == str(SPEC_DIR / "rbln-ca12.toml")


def test_atom_max_card():
    spec = load_spec("RBLN-CA25")
    assert spec.dies == 4 and spec.power_w == 350.0 and spec.base == "RBLN-CA12"
    assert spec.die == load_spec("RBLN-CA12").die  # same die, inherited through base
    assert spec.dies * spec.die.compute.fp16_tflops == 128.0
    assert spec.dies * spec.die.memory.dram_gib == 64.0
    assert spec.published_totals.fp16_tflops == 128.0
    assert spec.published_totals.dram_gib == 64.0
    assert spec.published_totals.int8_tops == 512.0


def test_unknown_dtype_peak():
    with pytest.raises(SpecError, match="float32"):
        load_spec("RBLN-CA12").die.compute.peak_flops("float32")


def test_name_lookup_is_case_insensitive():
    assert load_spec("rbln-ca25") == load_spec("RBLN-CA25") == load_spec("Rbln-Ca25")


def test_load_from_path(tmp_path):
    path = write(tmp_path, CA12_TEXT.replace('name = "RBLN-CA12"', 'name = "MY-CARD"'))
    spec = load_spec(path)
    assert spec.name == "MY-CARD" and spec.source == str(path)
    assert spec.die == load_spec("RBLN-CA12").die
    assert load_spec(str(path)) == spec


def test_base_inheritance_with_override(tmp_path):
    path = write(tmp_path, """
base = "RBLN-CA25"
name = "CA25-SLOW-SWITCH"
description = "what if the switch were slower"
[links.die_to_die]
bandwidth_gbps = 32.0
""")
    spec, parent = load_spec(path), load_spec("RBLN-CA25")
    assert spec.name == "CA25-SLOW-SWITCH" and spec.base == "RBLN-CA25"
    assert spec.links.die_to_die.bandwidth_gbps == 32.0
    assert spec.links.die_to_die.name == parent.links.die_to_die.name  # rest of the table kept
    assert spec.links.die_to_die.latency_us == parent.links.die_to_die.latency_us
    assert spec.die == parent.die and spec.dies == 4
    assert spec.published_totals == parent.published_totals


def test_base_path_is_relative_to_the_file(tmp_path, monkeypatch):
    write(tmp_path, CA12_TEXT.replace('name = "RBLN-CA12"', 'name = "PARENT"'), "parent.toml")
    sub = tmp_path / "sub"
    sub.mkdir()
    write(sub, 'base = "../parent.toml"\nname = "CHILD"\n', "child.toml")
    monkeypatch.chdir(sub.parent.parent)  # not the files' directory
    spec = load_spec(sub / "child.toml")
    assert spec.name == "CHILD" and spec.die == load_spec("RBLN-CA12").die


# ---- malformed specs: one error each, naming the problem ----------------------------------------

def test_invalid_toml(tmp_path):
    message = spec_error(write(tmp_path, 'name = "RBLN-CA12\ndies = 1\n'))
    assert "not valid TOML" in message and "spec.toml" in message


def test_unknown_key(tmp_path):
    message = spec_error(write(tmp_path, 'base = "RBLN-CA12"\n[die.compute]\nwarp_size = 32\n'))
    assert "unknown key" in message and "warp_size" in message and "die.compute" in message


def test_missing_key(tmp_path):
    text = "\n".join(line for line in CA12_TEXT.splitlines() if not line.startswith("int4_tops"))
    message = spec_error(write(tmp_path, text))
    assert "missing key 'int4_tops'" in message and "die.compute" in message


def test_wrong_type(tmp_path):
    message = spec_error(write(tmp_path, 'base = "RBLN-CA12"\n[die.memory]\ndram_gib = "16"\n'))
    assert "die.memory.dram_gib" in message and "must be a number" in message


def test_wrong_type_integer(tmp_path):
    message = spec_error(write(tmp_path, 'base = "RBLN-CA12"\ndies = 1.5\n'))
    assert "dies" in message and "positive integer" in message


def test_negative_number(tmp_path):
    message = spec_error(write(tmp_path,
                               'base = "RBLN-CA12"\n[die.memory]\ndram_bandwidth_gbps = -256.0\n'))
    assert "die.memory.dram_bandwidth_gbps" in message and "must be positive" in message


def test_totals_inconsistent(tmp_path):
    message = spec_error(write(tmp_path, 'base = "RBLN-CA25"\ndies = 2\n'))
    assert "published_totals.fp16_tflops = 128" in message and "2 dies" in message


def test_base_cycle(tmp_path):
    write(tmp_path, 'base = "b.toml"\nname = "A"\n', "a.toml")
    write(tmp_path, 'base = "a.toml"\nname = "B"\n', "b.toml")
    message = spec_error(tmp_path / "a.toml")
    assert "inherits from itself" in message and "a.toml" in message


def test_base_self_cycle(tmp_path):
    path = write(tmp_path, 'base = "spec.toml"\n')
    assert "inherits from itself" in spec_error(path)


def test_unknown_product():
    message = spec_error("RBLN-XYZ")
    assert "unknown NPU product 'RBLN-XYZ'" in message
    assert "RBLN-CA12" in message and "RBLN-CA25" in message  # says what exists


def test_unknown_base_product(tmp_path):
    assert "unknown NPU product 'NOPE'" in spec_error(write(tmp_path, 'base = "NOPE"\n'))


def test_missing_file(tmp_path):
    message = spec_error(tmp_path / "nope.toml")
    assert "does not exist" in message and "nope.toml" in message


# ---- the virtual machine ------------------------------------------------------------------------

def test_default_machine():
    machine = current_machine()
    assert machine.spec.name == "RBLN-CA25" and machine.cards == 1
    assert device_count() == 4
    assert [(d.index, d.card, d.die) for d in machine.devices] == [(i, 0, i) for i in range(4)]
    assert str(machine.device(3)) == "rbln:3 (RBLN-CA25 card 0, die 3)"


def test_two_cards(monkeypatch):
    monkeypatch.setenv("RBLN_VIRTUAL_CARDS", "2")
    reset_machine()
    machine = current_machine()
    assert device_count() == 8
    assert (machine.device(5).card, machine.device(5).die) == (1, 1)
    assert machine.same_card(0, 3) and not machine.same_card(3, 4)


def test_ca12_is_one_device_per_card(monkeypatch):
    monkeypatch.setenv("RBLN_VIRTUAL_NPU", "RBLN-CA12")
    monkeypatch.setenv("RBLN_VIRTUAL_CARDS", "3")
    reset_machine()
    assert device_count() == 3
    assert get_npu_name(2) == "RBLN-CA12"


def test_machine_from_spec_path(monkeypatch, tmp_path):
    path = write(tmp_path, 'base = "RBLN-CA25"\nname = "LAB-CARD"\n')
    monkeypatch.setenv("RBLN_VIRTUAL_NPU", str(path))
    reset_machine()
    assert device_count() == 4 and get_npu_name(0) == "LAB-CARD"


def test_machine_is_cached_until_reset(monkeypatch):
    assert device_count() == 4
    monkeypatch.setenv("RBLN_VIRTUAL_CARDS", "2")
    assert device_count() == 4
    reset_machine()
    assert device_count() == 8


@pytest.mark.parametrize("cards, needle", [("abc", "must be an integer"), ("0", "between 1 and 8"),
                                           ("9", "between 1 and 8")])
def test_bad_card_count(monkeypatch, cards, needle):
    monkeypatch.setenv("RBLN_VIRTUAL_CARDS", cards)
    reset_machine()
    with pytest.raises(SpecError, match=needle) as info:
        device_count()
    assert "RBLN_VIRTUAL_CARDS" in str(info.value)


def test_bad_product(monkeypatch):
    monkeypatch.setenv("RBLN_VIRTUAL_NPU", "RBLN-NOPE")
    reset_machine()
    with pytest.raises(SpecError, match="unknown NPU product 'RBLN-NOPE'"):
        current_machine()


def test_device_queries():
    assert npu_is_available() and npu_is_available(3)
    assert not npu_is_available(4) and not npu_is_available(-1)
    assert get_npu_name() == "RBLN-CA25" and get_npu_name(3) == "RBLN-CA25"


def test_missing_device_names_the_count():
    with pytest.raises(DeviceError, match=r"device 99 does not exist.*4 device\(s\)"):
        current_machine().device(99)
    with pytest.raises(DeviceError, match="4 device"):
        get_npu_name(4)
    with pytest.raises(DeviceError, match="must be an int"):
        current_machine().device("0")
