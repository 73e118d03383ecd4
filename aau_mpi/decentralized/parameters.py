"""A model's state as one flat vector on its device: what a rank deposits and mixes.

Decentralized averaging mixes whole models, so `FlatParameters(module)` lays
every parameter AND every floating-point buffer out inside one contiguous
float32 tensor `flat`, on the module's device, and makes each of them a view
into it. A deposit or a mix is then a single transfer or a single fused
operation, and BatchNorm's running statistics are averaged with the weights
they belong to (otherwise the final average would carry one rank's
statistics).

Only what training changes is communicated. `flat` is laid out as

    [trainable parameters, persistent floating buffers | frozen parameters,
     non-persistent floating buffers]

and the first part, `shared` (a view: `flat[:shared_numel]`), is what a
rank deposits, mixes and averages. The rest never moves: a frozen backbone
(parameters with requires_grad=False when the FlatParameters is built)
costs no bandwidth and stays bit-identical (mixing equal values drifts them
by rounding), and a non-persistent buffer (a causal mask of -inf, rotary
tables: derived, not learned) keeps its values. A model without frozen
parameters or non-persistent buffers is laid out as before this split
(layout 1: every parameter, then every floating buffer), so its
checkpointed vectors load unchanged; `load_(vector, layout=1)` places
another model's old vector. Each tensor is laid out once, however many
modules hold it (tied weights, a mask that every block registers).

Integer buffers (BatchNorm's `num_batches_tracked`) are not in `flat`: they
count, they are not averaged; `counters` names the persistent ones.

Gradients are left alone: autograd and the user's torch optimizer work on the
parameters as usual (the optimizer updates them in place, which writes into
`flat`), so `zero_grad(set_to_none=True)`, gradient clipping and AMP's
GradScaler keep working. Keep the sharing intact: move the module to its
device BEFORE flattening (`module.to()` makes new tensors); `views_intact()`
checks, and the optimizer refuses to step when it fails.

A deposit that runs on the communication thread outlives the `step()` that
made it, while the user's loop goes on writing the model in place (a BatchNorm
forward updates its running statistics, clipping, pruning masks,
`load_state_dict`). So a deposit never reads the live `shared` part: `DepositSource`
takes a snapshot of it before `step()` returns (a host copy on the CPU; on a
GPU a device-to-device copy on the current stream, then a device-to-host copy
into pinned memory on a side stream), and the thread deposits the snapshot.
"""

import torch

from aau_mpi.base.errors import UserError

# The order of `flat` (saved with a model's vector, see load_): 1 = every
# parameter, then every floating buffer (aau_mpi until frozen parameters were
# kept local); 2 = the communicated part first, as the module docstring says.
LAYOUT = 2


def _buffers(module):
    """[(holders, tensor, persistent)] of each buffer, once however many modules hold
    it: holders are (module, name) pairs; persistent when any holder saves it."""
    found = {}
    for owner in module.modules():
        for name, buffer in owner._buffers.items():
            if buffer is not None:
                holders, _, persistent = found.get(id(buffer), ([], buffer, False))
                holders.append((owner, name))
                found[id(buffer)] = (holders, buffer,
                                     persistent or name not in owner._non_persistent_buffers_set)
    return list(found.values())


class FlatParameters:
    """All of a module's parameters and floating buffers as views into one float32
    tensor, the communicated part (`shared`) first."""

    def __init__(self, module):
        params = list(module.parameters())  # a tied parameter once
        self.trainable = [p for p in params if p.requires_grad]
        self.frozen = [p for p in params if not p.requires_grad]
        if not self.trainable:
            raise UserError("the model has no parameters to train (none with requires_grad="
                            "True): unfreeze the ones to train before wrapping the model")
        buffers = _buffers(module)
        floating = [(holders, b, persistent) for holders, b, persistent in buffers
                    if b.is_floating_point()]
        self.counters = [holders[0] for holders, b, persistent in buffers
                         if persistent and not b.is_floating_point() and not b.is_complex()
                         and b.dtype != torch.bool]
        tensors = params + [b for _, b, _ in floating]
        if any(t.dtype != torch.float32 for t in tensors):
            raise UserError("aau_mpi averages float32 models: keep the parameters float32 "
                            "(use torch.autocast for mixed precision, not model.half())")
        device = params[0].device
        if any(t.device != device for t in tensors):
            raise UserError("the model's parameters are on several devices: move the whole "
                            "model to one device (model.to(ctx.device)) before wrapping it")
        # (tensor, its buffer holders or None for a parameter), in flat's order
        order = ([(p, None) for p in self.trainable]
                 + [(b, holders) for holders, b, persistent in floating if persistent]
                 + [(p, None) for p in self.frozen]
                 + [(b, holders) for holders, b, persistent in floating if not persistent])
        shared = len(self.trainable) + sum(persistent for _, _, persistent in floating)
        self.device = device
        self.params = params
        self.trainable_numel = sum(p.numel() for p in self.trainable)
        self.shared_numel = sum(t.numel() for t, _ in order[:shared])
        self.numel = sum(t.numel() for t, _ in order)
        self.gradient_numel = self.trainable_numel + len(self.trainable)
        self.flat = torch.empty(self.numel, dtype=torch.float32, device=device)
        self.shared = self.flat[:self.shared_numel]
        self._places = []  # (parameter or None, buffer holders or None, offset), for views_intact
        offsets = {}
        offset = 0
        with torch.no_grad():
            for tensor, holders in order:
                size = tensor.numel()
                view = self.flat[offset:offset + size].view_as(tensor)
                view.copy_(tensor)
                offsets[id(tensor)] = offset
                if holders is None:
                    tensor.data = view
                else:
                    for owner, name in holders:
                        owner._buffers[name] = view
                self._places.append((tensor if holders is None else None, holders, offset))
                offset += size
        # Where each tensor's values lie in a vector of layout 1, and here.
        self._first_layout = [(offsets[id(t)], t.numel()) for t in tensors]

    def views_intact(self):
        """True while every parameter and buffer still lives at its place in flat."""
        start, element = self.flat.data_ptr(), self.flat.element_size()
        for param, holders, offset in self._places:
            live = [param] if holders is None else [owner._buffers[name]
                                                    for owner, name in holders]
            if any(t is None or t.data_ptr() != start + offset * element for t in live):
                return False
        return True

    def frozen_unchanged(self):
        """True while no parameter that was frozen when flattened requires grad: one
        unfrozen later would train on each rank without ever being averaged."""
        return not any(p.requires_grad for p in self.frozen)

    def host_copy(self):
        """flat as a float32 numpy array (a copy on a GPU, a view on the CPU)."""
        return self.flat.detach().cpu().numpy() if self.device.type != "cpu" \
            else self.flat.detach().numpy()

    def load_(self, vector, layout=LAYOUT):
        """Overwrite flat (and so the model) with `vector` (numpy or tensor, numel
        values) laid out as `layout` (see LAYOUT; 1: a vector saved before)."""
        values = torch.as_tensor(vector, dtype=torch.float32)
        if values.shape != (self.numel,):
            raise ValueError(f"expected a vector of {self.numel} values, got shape "
                             f"{tuple(values.shape)}")
        if layout not in (1, LAYOUT):
            raise ValueError(f"parameters of layout {layout} are not known here (1 or "
                             f"{LAYOUT})")
        with torch.no_grad():
            if layout == LAYOUT:
                self.flat.copy_(values)
                return
            start = 0
            for offset, size in self._first_layout:
                self.flat[offset:offset + size].copy_(values[start:start + size])
                start += size

    def gradients(self, out):
        """Copy every trainable parameter's gradient into the flat tensor `out` (zeros
        where None), then one flag per parameter: 1 where it has a gradient, 0 where
        None. Summed over ranks, a flag of 0 says that no rank had one."""
        offset = 0
        for param in self.trainable:
            size = param.numel()
            if param.grad is None:
                out[offset:offset + size].zero_()
            else:
                out[offset:offset + size].copy_(param.grad.reshape(-1))
            offset += size
        flags = torch.tensor([p.grad is not None for p in self.trainable], dtype=out.dtype)
        out[offset:].copy_(flags)

    def set_gradients(self, flat_gradients):
        """Write a flat gradient laid out as `gradients` writes it (flags summed over
        ranks) back into each trainable parameter's .grad; a parameter whose flag
        is 0 keeps .grad None, so weight decay and momentum leave it alone."""
        had = flat_gradients[self.trainable_numel:].cpu()
        offset = 0
        for param, flag in zip(self.trainable, had.tolist()):
            size = param.numel()
            piece = flat_gradients[offset:offset + size].view_as(param)
            offset += size
            if flag == 0:
                continue
            if param.grad is None:
                param.grad = piece.clone()
            else:
                param.grad.copy_(piece)


class DepositSource:
    """What a deposit reads: the communicated vector (`shared`) as of the end of a step, whatever runs after it.

    `take()` runs on the caller's thread before `step()` returns and gives
    (payload, before): the numpy array to deposit and a function the
    depositing thread calls first (None when there is nothing to wait for).

    - CPU, deposit inline: the deposit completes inside `step()`, so the
      payload is the vector itself (no copy).
    - CPU, deposit on the thread: a host copy of it (one memcpy, on the
      caller's thread: measured without it, 14-16 of 40 payloads of a model
      with BatchNorm carried two models).
    - GPU: a device-to-device snapshot on the current stream, ordered after
      the step's kernels and before whatever the loop queues next (the
      user's kernels may rewrite the vector before a side-stream copy of
      it ran); then the side stream copies the snapshot into pinned host
      memory while the loop computes, and `before` waits for that copy on a
      blocking event (the waiting thread sleeps instead of spinning a core).
    """

    def __init__(self, vector, threaded):
        self.vector = vector
        self.device = vector.device
        if self.device.type == "cuda":
            self.snapshot = torch.empty_like(vector)
            self.buffer = torch.empty(vector.numel(), dtype=torch.float32, pin_memory=True)
            self.stream = torch.cuda.Stream(device=self.device)
            self.copied = torch.cuda.Event(blocking=True)
        else:
            self.buffer = torch.empty_like(vector) if threaded else None
        self.array = (self.buffer if self.buffer is not None else vector).detach().numpy()

    def take(self):
        """Snapshot the vector now; returns (payload array, before)."""
        with torch.no_grad():
            if self.device.type != "cuda":
                if self.buffer is not None:
                    self.buffer.copy_(self.vector)
                return self.array, None
            current = torch.cuda.current_stream(self.device)
            # The previous device-to-host copy reads the snapshot: it must be
            # done before the snapshot is overwritten (stream order, no host wait).
            current.wait_event(self.copied)
            self.snapshot.copy_(self.vector)
            self.stream.wait_stream(current)
            with torch.cuda.stream(self.stream):
                self.buffer.copy_(self.snapshot, non_blocking=True)
                self.copied.record(self.stream)
            return self.array, self.copied.synchronize
