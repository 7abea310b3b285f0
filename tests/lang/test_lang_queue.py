"""Launches on the runtime's work queue: ordering with tensor operations, frees, failures."""

from __future__ import annotations

import gc
from typing import ClassVar

import numpy as np
import pytest

import kbus
import kbus.lang as kl
from kbus.runtime.queue import FailureReport


@kbus.kernel
def scale(x_ptr, out_ptr, n, factor, BLOCK: kl.constexpr):
    offs = kl.program_id(0) * BLOCK + kl.arange(0, BLOCK)
    mask = offs < n
    kl.store(out_ptr + offs, kl.load(x_ptr + offs, mask=mask) * factor, mask=mask)


@kbus.kernel
def fault(x_ptr):
    kl.load(x_ptr - (1 << 40))


@pytest.mark.asyncio
async def test_launch_is_ordered_with_queued_tensor_work() -> None:
    async with kbus.open_device("tiny") as torch:
        n = 5000
        host = np.arange(n, dtype=np.float32)
        x = torch.tensor(host)  # upload queued, not awaited
        y = x + 1  # queued after the upload
        out = torch.empty(n, dtype=np.float32)
        handle = scale[(kl.cdiv(n, 1024),)](y, out, n, 2.0, BLOCK=1024)  # queued after y, at once
        assert isinstance(handle, kl.LaunchHandle)
        z = out * 10  # a runtime op on the kernel's output waits for the launch
        np.testing.assert_array_equal(await z.numpy(), (host + 1) * 20)
        result = await handle
        assert handle.done() and result.instances == 5


@pytest.mark.asyncio
async def test_free_waits_for_the_launch() -> None:
    async with kbus.open_device("tiny") as torch:
        x = torch.tensor(np.ones(2048, np.float32))
        out = torch.empty(2048, dtype=np.float32)
        handle = scale[(2,)](x, out, 2048, 3.0, BLOCK=1024)
        x.free()  # queued behind the launch that reads it
        del x
        await handle
        np.testing.assert_array_equal(await out.numpy(), np.full(2048, 3, np.float32))


@kbus.kernel
def store_then_fault(x_ptr, out_ptr, BLOCK: kl.constexpr):
    offs = kl.program_id(0) * BLOCK + kl.arange(0, BLOCK)
    kl.store(out_ptr + offs, kl.load(x_ptr + offs) * 2)
    kl.load(x_ptr - (1 << 40))


@pytest.mark.asyncio
async def test_failure_goes_to_the_awaiter_and_tensors_it_did_not_write_stay_usable() -> None:
    async with kbus.open_device("tiny") as torch:
        x = torch.tensor(np.ones(16, np.float32))
        with pytest.raises(kbus.KernelError, match=r"kernel 'fault' failed on 1 of 1 PE\(s\).*faulted at VA"):
            await fault[(1,)](x)
        np.testing.assert_array_equal(await (x * 2).numpy(), np.full(16, 2, np.float32))
        await torch.synchronize()  # that failure was observed: nothing to report


@pytest.mark.asyncio
async def test_unawaited_failure_is_raised_by_synchronize_once() -> None:
    async with kbus.open_device("tiny") as torch:
        x = torch.tensor(np.ones(16, np.float32))
        fault[(1,)](x)  # never awaited
        with pytest.raises(kbus.KernelError, match=r"kernel 'fault' failed on 1 of 1 PE\(s\).*faulted at VA"):
            await torch.synchronize()
        await torch.synchronize()  # raised once
        np.testing.assert_array_equal(await x.numpy(), np.ones(16, np.float32))


@pytest.mark.asyncio
async def test_unawaited_failure_is_raised_at_the_next_await_on_a_tensor_it_wrote() -> None:
    async with kbus.open_device("tiny") as torch:
        x = torch.tensor(np.ones(1024, np.float32))
        out = torch.zeros(1024, dtype=np.float32)
        handle = store_then_fault[(1,)](x, out, BLOCK=1024)
        del handle
        gc.collect()
        with pytest.raises(kbus.KernelError, match=r"kernel 'store_then_fault' failed .* program \(0, 0, 0\) faulted"):
            await out
        with pytest.raises(
            kbus.KernelError,
            match=r"unavailable because an earlier command failed: KernelError: kernel 'store_then_fault'",
        ):
            await (out + 1).numpy()
        np.testing.assert_array_equal(await x.numpy(), np.ones(1024, np.float32))  # read, not written
        await torch.synchronize()  # observed through `out`: not raised again


@pytest.mark.asyncio
async def test_unawaited_failure_is_raised_at_device_close() -> None:
    with pytest.raises(kbus.KernelError, match=r"kernel 'fault' failed on 1 of 1 PE\(s\)"):
        async with kbus.open_device("tiny") as torch:
            x = torch.tensor(np.ones(16, np.float32))
            fault[(1,)](x)


@pytest.mark.asyncio
async def test_unobserved_failure_warns_naming_the_kernel() -> None:
    with pytest.warns(RuntimeWarning, match=r"KernelError\(\"kernel 'fault' failed"), pytest.raises(ZeroDivisionError):
        async with kbus.open_device("tiny") as torch:
            x = torch.tensor(np.ones(16, np.float32))
            fault[(1,)](x)
            await x
            1 / 0  # noqa: B018  # the body fails first: closing can only warn about the launch


def test_a_failure_report_dropped_unobserved_warns() -> None:
    class Queue:
        inflight: ClassVar[dict[object, None]] = {}

    report = FailureReport(
        Queue(), kbus.KernelError("kernel 'k' failed on 1 of 1 PE(s): boom", ()), "kernel k[1, 1, 1]"
    )
    assert Queue.inflight == {report: None}
    Queue.inflight.clear()
    with pytest.warns(RuntimeWarning, match=r"kernel k\[1, 1, 1\] failed and nothing observed it: kernel 'k' failed"):
        del report
        gc.collect()


@pytest.mark.asyncio
async def test_launch_on_a_failed_input_reports_the_earlier_failure() -> None:
    async with kbus.open_device("tiny") as torch:
        bad = torch.tensor(np.ones(4, np.float32))

        async def boom() -> None:
            raise kbus.DeviceError("simulated device failure")

        torch.submit(boom, writes=[bad], label="boom")  # the work producing `bad` fails
        out = torch.empty(4, dtype=np.float32)
        with pytest.raises(kbus.DeviceError, match="unavailable because an earlier command failed: boom failed"):
            await scale[(1,)](bad, out, 4, 1.0, BLOCK=4)
