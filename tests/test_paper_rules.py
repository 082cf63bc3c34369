from tests.harness import scripted_pair, BASE_PROMPT as PB, NUDGING_PROMPT as PN
async def test_smoke():
    with scripted_pair() as pair:
        pair.nudger.add(PN, [(" Sure", .9), ("!", .9), (" The", .9), (" sky", .9), (" is", .9)], eos=False)
        pair.base.add(PB + " Sure!", [(" Well", .2)], eos=False)
        pair.base.add(PB + " Sure! The", [(" sky", .8), (" is", .9), (" blue", .9), (".", .3), (" Next", .5)], eos=False)
        pair.nudger.add(PN + " Sure! The sky is blue", [(".", .9), (" Bye", .9)], eos=True)
        out = await pair.run(lookahead_tokens=5, strategy="paper")
        print(out.text, out.stats, pair.base.requests, pair.nudger.requests)
        assert out.text == " Sure! The sky is blue. Bye"
