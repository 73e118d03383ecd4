"""Pure decisions and maths: the policies that choose whom to wait for from
header snapshots, straggler models, the emulated accelerator's step
(emulation), when to evaluate and stop (schedule), the
graphs and their mixing weights (graphs), the topology file format (topology),
and learning-rate schedules over global progress (learning_rate). No MPI and
no torch: everything here is tested without a launcher."""
