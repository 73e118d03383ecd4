"""Transport: MPI start-up and the job clock (world), the mailbox slot header and
the one-sided RMA windows (header, mailbox), job-wide control words on rank 0
(control), the communication thread that deposits while the loop computes
(depositor), and a lost rank under ULFM (survivors). It moves bytes and
sequence numbers; it knows no policy and imports no torch."""
