"""The thinnest path end to end: a real daemon, a real socket, a sealed session."""

from __future__ import annotations

import trio

from ninefs.protocol import messages as m


async def test_read_synthetic_files(client, node):
    with trio.fail_after(10):
        assert (await client.read_file("/node/name")).decode() == "n1\n"
        load = (await client.read_file("/cpu/load")).decode().split()
        assert len(load) == 3 and all(float(x) >= 0 for x in load)
        names = [e.name for e in await client.list_dir("/")]
        assert {"node", "cpu", "mem", "jobs", "storage", "metrics"} <= set(names)
        st = await client.stat_path("/cpu")
        assert st.mode & m.DMDIR
