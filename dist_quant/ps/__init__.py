"""The parameter-server job: the pieces a rank holds (a worker, a server's shard, the leader),
where they sit (``placement``) and how bytes move between them (``fabric``), the state a rank
keeps (``state``), the synchronous step (``sync_step``), the asynchronous one (``async_*``,
fed by the arrival sources of ``arrivals``), and the one place that starts a rank and picks
the step (``start``)."""
