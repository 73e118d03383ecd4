"""A model's state as one flat vector on its device: what a rank deposits and mixes.

Decentralized averaging mixes whole models, so `FlatParameters(module)` lays
every parameter AND every floating-point buffer (BatchNorm's running mean and
variance) out inside one contiguous float32 tensor `flat`, on the module's
device, and makes each of them a view into it. A deposit or a mix is then a
single transfer or a single fused operation, and the running statistics are
averaged with the weights they belong to (otherwise the final average would
carry one rank's statistics). Integer buffers (BatchNorm's
`num_batches_tracked`) stay per rank: they count, they are not averaged.

Gradients are left alone: autograd and the user's torch optimizer work on the
parameters as usual (the optimizer updates them in place, which writes into
`flat`), so `zero_grad(set_to_none=True)`, gradient clipping and AMP's
GradScaler keep working. Keep the sharing intact: move the module to its
device BEFORE flattening (`module.to()` makes new tensors); `views_intact()`
checks, and the optimizer refuses to step when it fails.

A deposit that runs on the communication thread outlives the `step()` that
made it, while the user's loop goes on writing `flat` in place (a BatchNorm
forward updates its running statistics, clipping, pruning masks,
`load_state_dict`). So a deposit never reads `flat` itself: `DepositSource`
takes a snapshot of it before `step()` returns (a host copy on the CPU; on a
GPU a device-to-device copy on the current stream, then a device-to-host copy
into pinned memory on a side stream), and the thread deposits the snapshot.
"""

import torch

from aau_mpi.errors import UserError


def _floating_buffers(module):
    """(owning module, name, tensor) of every floating-point buffer, once each."""
    seen, found = set(), []
    for owner in module.modules():
        for name, buffer in owner._buffers.items():
            if buffer is not None and buffer.is_floating_point() and id(buffer) not in seen:
                seen.add(id(buffer))
                found.append((owner, name, buffer))
    return found


class FlatParameters:
    """All of a module's parameters and floating buffers as views into one float32 tensor."""

    def __init__(self, module):
        params = list(module.parameters())
        if not params:
            raise UserError("the model has no parameters to train: pass the model whose "
                            "parameters the optimizer updates")
        buffers = _floating_buffers(module)
        tensors = params + [buffer for _, _, buffer in buffers]
        if any(t.dtype != torch.float32 for t in tensors):
            raise UserError("aau_mpi averages float32 models: keep the parameters float32 "
                            "(use torch.autocast for mixed precision, not model.half())")
        device = params[0].device
        if any(t.device != device for t in tensors):
            raise UserError("the model's parameters are on several devices: move the whole "
                            "model to one device (model.to(ctx.device)) before wrapping it")
        self.device = device
        self.param_numel = sum(p.numel() for p in params)
        self.numel = sum(t.numel() for t in tensors)
        self.flat = torch.empty(self.numel, dtype=torch.float32, device=device)
        self._views = []  # (tensor, offset) for views_intact
        offset = 0
        with torch.no_grad():
            for param in params:
                size = param.numel()
                self.flat[offset:offset + size].copy_(param.reshape(-1))
                param.data = self.flat[offset:offset + size].view_as(param)
                self._views.append((param, offset))
                offset += size
            for owner, name, buffer in buffers:
                size = buffer.numel()
                self.flat[offset:offset + size].copy_(buffer.reshape(-1))
                owner._buffers[name] = self.flat[offset:offset + size].view_as(buffer)
                self._views.append((owner._buffers[name], offset))
                offset += size
        self._buffer_owners = [(owner, name) for owner, name, _ in buffers]
        self.params = params

    def views_intact(self):
        """True while every parameter and buffer still lives at its place in flat."""
        element = self.flat.element_size()
        live = [p for p in self.params] + [owner._buffers[name]
                                            for owner, name in self._buffer_owners]
        return all(t.data_ptr() == self.flat.data_ptr() + offset * element
                   for t, (_, offset) in zip(live, self._views))

    def host_copy(self):
        """flat as a float32 numpy array (a copy on a GPU, a view on the CPU)."""
        return self.flat.detach().cpu().numpy() if self.device.type != "cpu" \
            else self.flat.detach().numpy()

    def load_(self, vector):
        """Overwrite flat (and so the model) with `vector` (numpy or tensor, numel values)."""
        values = torch.as_tensor(vector, dtype=torch.float32)
        if values.shape != (self.numel,):
            raise ValueError(f"expected a vector of {self.numel} values, got shape "
                             f"{tuple(values.shape)}")
        with torch.no_grad():
            self.flat.copy_(values)

    def gradients(self, out):
        """Copy every parameter's gradient (zeros where None) into the flat tensor `out`."""
        offset = 0
        for param in self.params:
            size = param.numel()
            if param.grad is None:
                out[offset:offset + size].zero_()
            else:
                out[offset:offset + size].copy_(param.grad.reshape(-1))
            offset += size

    def set_gradients(self, flat_gradients):
        """Write a flat gradient back into every parameter's .grad."""
        offset = 0
        for param in self.params:
            size = param.numel()
            piece = flat_gradients[offset:offset + size].view_as(param)
            if param.grad is None:
                param.grad = piece.clone()
            else:
                param.grad.copy_(piece)
            offset += size


class DepositSource:
    """What a deposit reads: `flat` as of the end of a step, whatever runs after it.

    `take()` runs on the caller's thread before `step()` returns and gives
    (payload, before): the numpy array to deposit and a function the
    depositing thread calls first (None when there is nothing to wait for).

    - CPU, deposit inline: the deposit completes inside `step()`, so the
      payload is `flat` itself (no copy).
    - CPU, deposit on the thread: a host copy of `flat` (one memcpy, on the
      caller's thread: measured without it, 14-16 of 40 payloads of a model
      with BatchNorm carried two models).
    - GPU: a device-to-device snapshot on the current stream, ordered after
      the step's kernels and before whatever the loop queues next (the
      user's kernels may rewrite `flat` before a side-stream copy of `flat`
      itself ran); then the side stream copies the snapshot into pinned host
      memory while the loop computes, and `before` waits for that copy on a
      blocking event (the waiting thread sleeps instead of spinning a core).
    """

    def __init__(self, flat, threaded):
        self.flat = flat
        self.device = flat.device
        if self.device.type == "cuda":
            self.snapshot = torch.empty_like(flat)
            self.buffer = torch.empty(flat.numel(), dtype=torch.float32, pin_memory=True)
            self.stream = torch.cuda.Stream(device=self.device)
            self.copied = torch.cuda.Event(blocking=True)
        else:
            self.buffer = torch.empty_like(flat) if threaded else None
        self.array = (self.buffer if self.buffer is not None else flat).detach().numpy()

    def take(self):
        """Snapshot flat now; returns (payload array, before)."""
        with torch.no_grad():
            if self.device.type != "cuda":
                if self.buffer is not None:
                    self.buffer.copy_(self.flat)
                return self.array, None
            current = torch.cuda.current_stream(self.device)
            # The previous device-to-host copy reads the snapshot: it must be
            # done before the snapshot is overwritten (stream order, no host wait).
            current.wait_event(self.copied)
            self.snapshot.copy_(self.flat)
            self.stream.wait_stream(current)
            with torch.cuda.stream(self.stream):
                self.buffer.copy_(self.snapshot, non_blocking=True)
                self.copied.record(self.stream)
            return self.array, self.copied.synchronize
