"""``mxep.EPConfig`` / ``mxep.KernelTiles``: the one, frozen kernel configuration of a Buffer
(no module-level tuning state, no environment variable). Bad values are refused at
construction, naming the field: tiles that are not powers of two, bools or non-positive ints,
wrong types; a config cannot change after it was built."""
import dataclasses

import pytest
import torch

import mxep
from mxep.ep.config import EPConfig, KernelTiles, default_config


def test_defaults_and_replace():
    cfg = EPConfig()
    assert cfg == default_config() == default_config("cpu", 7168) == mxep.default_config()
    assert cfg.dispatch == KernelTiles(1, 8192, 8, 32) and cfg.combine == KernelTiles(1, 8192, 8, 16)
    assert cfg.copy == KernelTiles(8, 1024, 8, 16) and cfg.pull == KernelTiles(2, 4096, 4, 32)
    assert (cfg.spread_parts, cfg.hw_cast, cfg.poison_outputs) == (16, True, False)
    assert (cfg.wait_polls, cfg.barrier_timeout_ms) == (1 << 25, 30_000)
    poisoned = cfg.replace(poison_outputs=True, wait_polls=1 << 20)
    assert poisoned.poison_outputs and poisoned.wait_polls == 1 << 20 and not cfg.poison_outputs
    assert poisoned.replace(poison_outputs=False, wait_polls=1 << 25) == cfg
    assert dataclasses.replace(cfg, copy=KernelTiles(4, 512, 4, 8)).copy.block_m == 4
    # the interpreter runs a few programs and polls a flag a few times; GPUs get the config's values
    assert cfg.num_programs(cfg.dispatch, torch.device("cpu")) == 4
    assert cfg.polls(torch.device("cpu")) == 16


def test_frozen():
    cfg = EPConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.poison_outputs = True
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.dispatch.block_m = 2
    assert {cfg, EPConfig()} == {cfg}     # hashable, by value


@pytest.mark.parametrize("field", ["block_m", "block_n", "warps"])
@pytest.mark.parametrize("bad", [3, 6, 1000, 1 << 20 | 1])
def test_tiles_must_be_powers_of_two(field, bad):
    kw = {**dict(block_m=1, block_n=8192, warps=8, programs_per_sm=32), field: bad}
    with pytest.raises(ValueError, match=f"KernelTiles.{field} must be a power of two"):
        KernelTiles(**kw)


@pytest.mark.parametrize("field", ["block_m", "block_n", "warps", "programs_per_sm"])
@pytest.mark.parametrize("bad", [0, -1, -8, True, False, 2.0, "2", None])
def test_tiles_must_be_positive_ints(field, bad):
    kw = {**dict(block_m=1, block_n=8192, warps=8, programs_per_sm=32), field: bad}
    with pytest.raises(ValueError, match=f"KernelTiles.{field} must be a positive int"):
        KernelTiles(**kw)


def test_programs_per_sm_need_not_be_a_power_of_two():
    assert KernelTiles(4, 64, 4, 3).programs_per_sm == 3


@pytest.mark.parametrize("field", ["spread_parts", "wait_polls", "barrier_timeout_ms"])
@pytest.mark.parametrize("bad", [0, -1, True, 1.5, "16", None])
def test_config_counts_must_be_positive_ints(field, bad):
    with pytest.raises(ValueError, match=f"EPConfig.{field} must be a positive int"):
        EPConfig(**{field: bad})
    with pytest.raises(ValueError, match=f"EPConfig.{field}"):
        EPConfig().replace(**{field: bad})


@pytest.mark.parametrize("field", ["hw_cast", "poison_outputs"])
@pytest.mark.parametrize("bad", [0, 1, "yes", None])
def test_config_flags_must_be_bools(field, bad):
    with pytest.raises(TypeError, match=f"EPConfig.{field} must be a bool"):
        EPConfig(**{field: bad})


@pytest.mark.parametrize("field", ["dispatch", "combine", "copy", "pull"])
@pytest.mark.parametrize("bad", [(1, 8192, 8, 32), {"block_m": 1}, None, 8])
def test_config_tiles_must_be_kernel_tiles(field, bad):
    with pytest.raises(TypeError, match=f"EPConfig.{field} must be a KernelTiles"):
        EPConfig(**{field: bad})


def test_no_module_level_tuning_state():
    """The knobs live in the config only: the old module-level tables and environment
    overrides are gone."""
    import mxep.ep.transport.symm_mem.dispatch as dispatch
    import mxep.ep.transport.symm_mem.memory as memory

    for mod in (mxep, dispatch, memory):
        for name in ("TUNING", "MXEP_TUNING", "MXEP_MAX_SPIN", "POISON_OUTPUTS", "HW_CAST_ON_GPU"):
            assert not hasattr(mod, name), (mod.__name__, name)
    with pytest.raises(TypeError):
        EPConfig(sync="flags")            # one sync protocol: no knob for it
    with pytest.raises(TypeError):
        EPConfig(peer_order="natural")    # one walk order (spread_parts=1 walks from row 0)
