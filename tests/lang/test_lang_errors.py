"""Faults and mistakes: every error names what was wrong and where, and the device keeps serving."""

from __future__ import annotations

import re

import numpy as np
import pytest

import kbus
import kbus.lang as kl
from kbus.protocol import KernelLaunchMsg, ScalarArg


@kbus.kernel
def unmasked_copy(x_ptr, out_ptr, BLOCK: kl.constexpr):
    offs = kl.program_id(0) * BLOCK + kl.arange(0, BLOCK)
    kl.store(out_ptr + offs, kl.load(x_ptr + offs))  # no mask: runs off the end


@kbus.kernel
def masked_copy(x_ptr, out_ptr, n, BLOCK: kl.constexpr):
    offs = kl.program_id(0) * BLOCK + kl.arange(0, BLOCK)
    mask = offs < n
    kl.store(out_ptr + offs, kl.load(x_ptr + offs, mask=mask), mask=mask)


@kbus.kernel
def raises(x_ptr):
    x = kl.load(x_ptr + kl.arange(0, 4))
    x.reshape(3, 3)


@kbus.kernel
def returns(x_ptr):
    return kl.load(x_ptr)


@pytest.mark.asyncio
@pytest.mark.parametrize("preset", ["tiny", "default"])
async def test_page_fault_names_kernel_program_pe_and_va(preset: str) -> None:
    async with kbus.open_device(preset) as torch:
        page = torch.config.memory.page_size
        n = page // 4  # exactly one page of float32, so the next page is unmapped
        only = kbus.Shard(dim=0, targets=[(0, 0, 0)])
        out = torch.zeros(n, dtype=np.float32, policy=only)
        x = torch.tensor(np.arange(n, dtype=np.float32), policy=only)  # the last VA allocated: nothing above it
        await x
        with pytest.raises(kbus.KernelError) as info:
            await unmasked_copy[(2,)](x, out, BLOCK=n)
        msg = str(info.value)
        bad_va = x.addr + page
        assert "kernel 'unmasked_copy' failed on 1 of" in msg
        assert re.search(r"sip\d\.cube\d\.pe\d\.cpu: kernel 'unmasked_copy' program \(1, 0, 0\)", msg)
        assert f"faulted at VA {bad_va:#x}" in msg
        assert "kl.load from x_ptr" in msg and "test_lang_errors.py" in msg
        assert isinstance(info.value, kbus.DeviceError) and info.value.responses
        # Program 0 stored to `out` before program 1 faulted: `out` carries the failure, the input `x`
        # stays readable, and the device still serves.
        with pytest.raises(kbus.KernelError, match="unavailable because an earlier command failed: KernelError"):
            await out.numpy()
        np.testing.assert_array_equal(await x.numpy(), np.arange(n, dtype=np.float32))
        out2 = torch.zeros(n, dtype=np.float32, policy=only)
        await masked_copy[(2,)](x, out2, n, BLOCK=n)
        np.testing.assert_array_equal(await out2.numpy(), np.arange(n, dtype=np.float32))
        assert torch.device.orphans == []


@pytest.mark.asyncio
async def test_masked_lanes_are_never_translated() -> None:
    async with kbus.open_device("tiny") as torch:
        x = torch.tensor(np.arange(10, dtype=np.float32))
        out = torch.zeros(10, dtype=np.float32)
        # BLOCK far beyond the tensor and its page: only the 10 unmasked lanes touch memory.
        await masked_copy[(1,)](x, out, 10, BLOCK=1 << 20)
        np.testing.assert_array_equal(await out.numpy(), np.arange(10, dtype=np.float32))


@pytest.mark.asyncio
async def test_python_exception_in_a_kernel_names_type_and_line() -> None:
    async with kbus.open_device("tiny") as torch:
        x = torch.tensor(np.arange(8, dtype=np.float32))
        with pytest.raises(kbus.KernelError, match=r"program \(0, 0, 0\) raised ValueError: cannot reshape") as info:
            await raises[(1,)](x)
        assert re.search(r"\[at test_lang_errors\.py:\d+\]", str(info.value))
        with pytest.raises(kbus.KernelError, match="returned a Tile; a kernel returns nothing"):
            await returns[(1,)](x)


@pytest.mark.asyncio
async def test_launch_mistakes_are_caught_on_the_host() -> None:
    async with kbus.open_device("tiny") as torch:
        x = torch.tensor(np.arange(8, dtype=np.float32))
        with pytest.raises(TypeError, match=r"kernel 'masked_copy': missing a required argument: 'BLOCK'"):
            masked_copy[(1,)](x, x, 8)
        with pytest.raises(TypeError, match="cannot tell which device to run on"):
            masked_copy[(1,)](1, 2, 8, BLOCK=4)
        with pytest.raises(ValueError, match=r"grid\[0\]=-1 is outside"):
            await masked_copy[(-1,)](x, x, 8, BLOCK=4)
        with pytest.raises(TypeError, match=r"grid must be an int or a tuple of 1 to 3 ints"):
            await masked_copy[(1, 1, 1, 1)](x, x, 8, BLOCK=4)
        with pytest.raises(ValueError, match="placement must be one of spread, owner"):
            await masked_copy[(1,)](x, x, 8, BLOCK=4, placement="nearest")
        with pytest.raises(TypeError, match=r"argument 'n': expected a kbus tensor or an int/float/bool scalar"):
            await masked_copy[(1,)](x, x, "8", BLOCK=4)
        with pytest.raises(ValueError, match=r"argument 'n': 18446744073709551616 does not fit in a 64-bit integer"):
            await masked_copy[(1,)](x, x, 2**64, BLOCK=4)
        with pytest.raises(TypeError, match=r"launch\(\) takes a @kbus.kernel"):
            await kl.launch(torch, print, (1,))  # type: ignore[arg-type]
        # Nothing above reached the device; a correct launch still works.
        out = torch.zeros(8, dtype=np.float32)
        await masked_copy[(1,)](x, out, 8, BLOCK=8)
        np.testing.assert_array_equal(await out.numpy(), np.arange(8, dtype=np.float32))


@pytest.mark.asyncio
async def test_malformed_launch_message_is_rejected_by_the_pe() -> None:
    async with kbus.open_device("tiny") as torch:
        dep = await kl.deploy(torch, masked_copy)
        bad = KernelLaunchMsg("t", "bad", dep.ref(), (ScalarArg("int", 1),), (0,), 0, (0,))
        with pytest.raises(kbus.DeviceError, match=r"kernel 'masked_copy': malformed launch: args\[1\] \(out_ptr\)"):
            await torch.device.request(bad)
