"""Bad input gets a specific error naming the tensors and shapes; the device stays usable afterwards."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

import kbus
from kbus.runtime import Replicate, Runtime, Shard


async def still_works(torch: Runtime) -> None:
    x = np.arange(10, dtype=np.float32)
    t = torch.tensor(x) * 2 + torch.ones(10, policy=Replicate())
    np.testing.assert_array_equal(await t.numpy(), x * 2 + 1)


@pytest.mark.asyncio
async def test_shape_mismatches_name_both_tensors() -> None:
    async with kbus.open_device("tiny") as torch:
        a = torch.zeros(4, 3, name="a")
        b = torch.zeros(5, 3, name="b")
        with pytest.raises(ValueError, match=r"do not broadcast: 'a' \(shape \(4, 3\).*'b' \(shape \(5, 3\)"):
            a + b
        with pytest.raises(ValueError, match=r"inner dimensions differ \(3 != 5\): 'a' \(shape \(4, 3\).*'b'"):
            a @ b
        with pytest.raises(ValueError, match=r"only 2-D @ 2-D.*'v' \(shape \(3,\)"):
            a @ torch.zeros(3, name="v")
        with pytest.raises(ValueError, match=r"dim 2 is out of range for 'a' \(shape \(4, 3\)"):
            a.sum(2)
        with pytest.raises(ValueError, match=r"Shard\(dim=3.*shape \(4, 3\)"):
            a.to(Shard(dim=3))
        await still_works(torch)


@pytest.mark.asyncio
async def test_unsupported_dtypes_and_operands() -> None:
    async with kbus.open_device("tiny") as torch:
        for bad in (np.complex64, np.bool_, object, "U3"):
            with pytest.raises(TypeError, match="is not supported by kbus tensors; supported: float16"):
                torch.zeros(3, dtype=bad)
        with pytest.raises(TypeError, match="dtype complex128 is not supported"):
            torch.tensor(np.ones(3, complex))
        with pytest.raises(TypeError, match="dtype bool is not supported"):
            torch.tensor([True, False])
        with pytest.raises(TypeError, match="'f99' is not a dtype"):
            torch.zeros(3, dtype="f99")
        a = torch.ones(3, name="a")
        with pytest.raises(TypeError, match=r"unsupported operand.*complex"):
            a + 1j
        with pytest.raises(TypeError, match=r"unsupported operand.*str"):
            a * "x"  # type: ignore[operator]
        with pytest.raises(TypeError, match="host ndarray; upload it first"):
            a + np.ones(3)
        with pytest.raises(TypeError, match="host ndarray"):
            np.ones(3) + a
        with pytest.raises(TypeError, match="both operands must be kbus tensors"):
            a @ 2  # type: ignore[operator]
        with pytest.raises(TypeError, match=r"rand.*int32 is not a floating type"):
            torch.rand(3, dtype=np.int32)
        with pytest.raises(TypeError, match="already a kbus tensor"):
            torch.tensor(a)
        with pytest.raises(ValueError, match="negative dimension"):
            torch.zeros(-1)
        with pytest.raises(ValueError, match="memory must be 'hbm' or 'sram'"):
            torch.zeros(3, memory="dram")
        with pytest.raises(OverflowError, match="out of bounds for uint8"):
            torch.zeros(3, dtype=np.uint8) + 300
        await still_works(torch)


@pytest.mark.asyncio
async def test_no_blocking_readback() -> None:
    async with kbus.open_device("tiny") as torch:
        a = torch.ones((), name="s")
        for convert in (np.asarray, float, int, bool, complex, list, lambda t: [0, 1][t], lambda t: 1 if t else 0):
            with pytest.raises(TypeError, match=r"'s' .*await t\.numpy\(\)"):
                convert(a)
        with pytest.raises(TypeError, match=r"len\(\) of a 0-d tensor"):
            len(a)
        assert await (np.float32(2) * a).item() == 2.0  # numpy defers to the tensor's operators
        with pytest.raises(ValueError, match=r"item\(\) needs a tensor with one element"):
            torch.zeros(2).item()


@pytest.mark.asyncio
async def test_tensor_from_another_device() -> None:
    async with kbus.open_device("tiny") as one, kbus.open_device("tiny") as two:
        a = one.ones(3, name="a")
        b = two.ones(3, name="b")
        with pytest.raises(ValueError, match=r"'b' \(shape \(3,\).*belongs to another device"):
            a + b
        with pytest.raises(ValueError, match="belongs to another device"):
            two.launch("nop", a)
        await still_works(one)
        await still_works(two)


@pytest.mark.asyncio
async def test_out_of_device_memory_is_raised_at_the_call() -> None:
    async with kbus.open_device("tiny") as torch:
        hbm = torch.config.memory.hbm_per_pe
        keep = torch.zeros(hbm // 2 // 4, policy=Replicate(), name="half")
        with pytest.raises(kbus.OutOfDeviceMemory) as info:
            torch.zeros(hbm // 4, policy=Replicate(), name="huge")
        msg = str(info.value)
        assert "torch.zeros(): cannot allocate tensor 'huge'" in msg
        assert "sip0.cube0.pe0.hbm: out of memory allocating 256 MiB" in msg
        assert "128 MiB free" in msg and "largest free block 128 MiB" in msg
        assert info.value.where == "sip0.cube0.pe0.hbm" and info.value.largest == hbm // 2
        # Sharded over 8 PEs the same tensor fits, and nothing leaked from the failed attempt.
        big = torch.zeros(hbm // 4, name="spread")
        assert torch.memory_stats().live_tensors == 2
        with pytest.raises(kbus.OutOfDeviceMemory, match="no device virtual address range"):
            torch.zeros(torch.config.memory.va_size // 4 + 1024)
        big.free()
        keep.free()
        assert torch.memory_stats().used == 0
        await still_works(torch)


@pytest.mark.asyncio
async def test_a_failing_kernel_fails_its_output_and_dependents_only() -> None:
    async with kbus.open_device("tiny") as torch:
        x = np.arange(8, dtype=np.float32)
        one_per_pe = kbus.Shard(min_bytes=0)  # 4 bytes on each PE, so sip0.cube1.pe2 computes a shard
        a = torch.tensor(x, name="a", policy=one_per_pe)
        b = torch.tensor(x, name="b", policy=one_per_pe)
        real_mul = torch.device.builtins["mul"]

        async def broken(cpu: Any, msg: Any) -> tuple[str | None, int | float | None]:
            if (cpu.sip, cpu.cube, cpu.pe) == (0, 1, 2):
                return f"{cpu.name}: simulated ALU fault", None
            return await real_mul(cpu, msg)

        torch.register_builtin("mul", broken)
        c = a * b
        d = c + 1  # depends on the failed c
        e = a + b  # independent: unaffected
        with pytest.raises(kbus.KernelError) as info:
            await c
        msg = str(info.value)
        assert msg.startswith("t1 = mul('a' (8,) float32, 'b' (8,) float32) failed: kernel_launch")
        assert "sip0.cube1.pe2.cpu: simulated ALU fault" in msg
        assert any(not r.success for r in info.value.responses)
        with pytest.raises(kbus.KernelError, match=r"input 't1' \(shape \(8,\).*earlier command failed.*ALU fault"):
            await d
        with pytest.raises(kbus.KernelError, match="ALU fault"):
            await d.numpy()
        assert "failed" in repr(c)
        np.testing.assert_array_equal(await e.numpy(), x + x)
        torch.register_builtin("mul", real_mul)
        np.testing.assert_array_equal(await (a * b).numpy(), x * x)
        await still_works(torch)


@pytest.mark.asyncio
async def test_device_side_errors_name_the_pe_and_address() -> None:
    async with kbus.open_device("tiny") as torch:

        async def wild(cpu: Any, msg: Any) -> tuple[str | None, int | float | None]:
            await cpu.device.read_va((cpu.sip, cpu.cube, cpu.pe), 0x1234_0000_0000, 64)
            return None, None

        torch.register_builtin("wild", torch.device.builtins["nop"])
        torch.device.builtins["wild"] = lambda cpu, msg: _catching(cpu, wild(cpu, msg))
        with pytest.raises(kbus.KernelError, match=r"page fault on sip0\.cube0\.pe3: VA 0x123400000000"):
            await torch.launch("wild", targets=[(0, 0, 3)])
        with pytest.raises(ValueError, match=r"no builtin kernel 'nope'.*known: add"):
            torch.launch("nope")
        with pytest.raises(TypeError, match=r"launch\('nop'\): argument 0: expected a tensor or a real number"):
            torch.launch("nop", "text")
        await still_works(torch)


async def _catching(cpu: Any, coro: Any) -> tuple[str | None, int | float | None]:
    try:
        return await coro  # type: ignore[no-any-return]
    except kbus.KbusError as exc:
        return f"{cpu.name}: {exc}", None


@pytest.mark.asyncio
async def test_trace_file_records_memory_events(tmp_path: Path) -> None:
    if getattr(kbus.trace, "attach_from_open_device", None) is None:
        with pytest.raises(NotImplementedError, match="attach_from_open_device"):
            async with kbus.open_device("tiny", trace=tmp_path / "t.json"):
                pass
        return
    path = tmp_path / "t.json"
    async with kbus.open_device("tiny", trace=path) as torch:
        assert torch.trace is not None
        a = torch.ones(4, name="traced")
        await (a + 1).numpy()
    text = path.read_text()
    assert '"traced"' in text and "alloc" in text and "free" in text


@pytest.mark.asyncio
async def test_bad_config_and_reentry() -> None:
    with pytest.raises(kbus.ConfigError, match="neither a preset nor a TOML file"):
        async with kbus.open_device("nonexistent-preset"):
            pass
    session = kbus.open_device("tiny")
    async with session:
        with pytest.raises(RuntimeError, match="already in use"):
            await session.__aenter__()


@pytest.mark.asyncio
async def test_work_that_can_never_finish_is_a_deadlock_not_a_hang() -> None:
    session = kbus.open_device("tiny")
    torch = await session.__aenter__()
    never = torch.sim.create_future("a signal nobody sends")

    async def stuck(cpu: Any, msg: Any) -> tuple[str | None, int | float | None]:
        await never
        return None, None

    torch.register_builtin("stuck", stuck)
    t = torch.zeros(4, name="victim")
    launch = torch.launch("stuck", t, targets=[0])
    with pytest.raises(kbus.DeadlockError, match="waits on future 'a signal nobody sends'"):
        await launch
    with pytest.raises(kbus.DeadlockError, match=r"launch stuck\('victim'"):
        await session.__aexit__(None, None, None)  # closing cannot wait for it either
    assert torch.closed and t.is_freed
    assert torch.sim.tasks() == []


@pytest.mark.asyncio
async def test_a_failed_builtin_launch_fails_its_output_not_its_inputs() -> None:
    async with kbus.open_device("tiny") as torch:
        x = np.arange(8, dtype=np.float32)
        a = torch.tensor(x, name="a")
        out = torch.zeros(8, name="out")

        async def broken(cpu: Any, msg: Any) -> tuple[str | None, int | float | None]:
            return f"{cpu.name}: simulated ALU fault", None

        torch.register_builtin("broken", broken)
        launch = torch.launch("broken", out, a, 2.0, targets=[0])  # builtins take their output first
        with pytest.raises(kbus.KernelError, match=r"launch broken\('out' \(8,\) float32, 'a'.*simulated ALU fault"):
            await launch
        # The input is read, not written: it stays readable; the output carries the failure.
        np.testing.assert_array_equal(await a.numpy(), x)
        np.testing.assert_array_equal(await (a + 1).numpy(), x + 1)
        with pytest.raises(kbus.KernelError, match="simulated ALU fault"):
            await out
        with pytest.raises(kbus.KernelError, match=r"input 'out' .*earlier command failed.*simulated ALU fault"):
            await out.numpy()
        await still_works(torch)
