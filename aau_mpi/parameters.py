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

On a GPU, `HostStaging` is the pinned host buffer that deposits are made
from: `stage()` copies `flat` into it on a side stream, asynchronously, and
the returned event tells when the copy is done.
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


class HostStaging:
    """A pinned host copy of a device tensor, refreshed asynchronously on a side stream."""

    def __init__(self, flat):
        self.flat = flat
        self.buffer = torch.empty(flat.numel(), dtype=torch.float32, pin_memory=True)
        self.array = self.buffer.numpy()
        self.stream = torch.cuda.Stream(device=flat.device)
        self.copied = torch.cuda.Event()

    def stage(self):
        """Start copying flat into the pinned buffer, after the work queued so far."""
        self.stream.wait_stream(torch.cuda.current_stream(self.flat.device))
        with torch.cuda.stream(self.stream):
            self.buffer.copy_(self.flat, non_blocking=True)
            self.copied.record(self.stream)

    def wait_copied(self):
        """Block this host thread until the last stage() copy is in the buffer."""
        self.copied.synchronize()

    def protect(self):
        """Make the current stream wait for the copy before it may change flat again."""
        torch.cuda.current_stream(self.flat.device).wait_event(self.copied)
