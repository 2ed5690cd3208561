from helpers import NodeHarness, link, wait_for

async def test_two(tmp_path):
    a = await NodeHarness(tmp_path / "a", gossip_interval=0.2, heartbeat_interval=0.3).start()
    b = await NodeHarness(tmp_path / "b", copy_examples=False, services={"hello_friend": "class handler:\n    async def get(self):\n        await self.write('hello friend!')\n"}, gossip_interval=0.2, heartbeat_interval=0.3).start()
    try:
        await a.add_user("alice")
        await link(a, b, service="hello_friend")
        r = await a.client().get("/hello_friend")
        assert r.text == "hello friend!"
    finally:
        await a.stop(); await b.stop()
