"""The SPEC consumer's correctness rule (integrations/torch_engine.py check), on the CPU with
small tensors: what a partial update may leave out, and what it may not."""
import collections
import unittest

try:
    import torch
except ImportError:  # run-tests.sh requires torch in CI
    torch = None

if torch is not None:
    from integrations.torch_engine import check, contents, expected, sparse_step, step_of


@unittest.skipIf(torch is None, "needs torch")
class CheckTest(unittest.TestCase):
    names = [f"t{i}" for i in range(6)]

    def model(self, step, every):
        """Params holding what `step` wants of each tensor."""
        return {n: expected(i, [4, 4], "cpu", step_of(i, step, every)) for i, n in enumerate(self.names)}

    def run_check(self, params, applied, step, every, held):
        counts = collections.Counter({n: 1 for n in applied})
        return check(params, self.names, counts, [], 1, "cpu", step, every, held)

    def test_a_whole_update_must_bring_every_tensor(self):
        params = self.model(0, 1)
        ok, checked, mismatched, missing, _ = self.run_check(params, self.names[1:], 0, 1, None)
        self.assertFalse(ok)
        self.assertEqual(missing, ["t0"])
        self.assertEqual((checked, mismatched), (6, []))

    def test_a_partial_update_may_leave_out_only_what_did_not_change(self):
        every = 3  # t0 and t3 change at every step after 0
        held = {n: step_of(i, 1, every) for i, n in enumerate(self.names)}
        params = self.model(2, every)
        ok, _, mismatched, missing, _ = self.run_check(params, ["t0", "t3"], 2, every, held)
        self.assertTrue(ok, (mismatched, missing))
        # t3 changed but did not come: the params still hold step 1's, which is missing.
        params["t3"] = expected(3, [4, 4], "cpu", 1)
        ok, _, mismatched, missing, _ = self.run_check(params, ["t0"], 2, every, held)
        self.assertFalse(ok)
        self.assertEqual((missing, mismatched), (["t3"], ["t3"]))


@unittest.skipIf(torch is None, "needs torch")
class SparseRuleTest(unittest.TestCase):
    def test_a_sparse_step_changes_one_element_in_a_hundred_of_nine_tensors_in_ten(self):
        shape = [50, 40]
        for i in (0, 3, 10, 11):
            before, after = contents(i, shape, "cpu", 1, 0), contents(i, shape, "cpu", 2, 0)
            changed = (before.view(torch.int16) != after.view(torch.int16)).sum().item()
            if i % 10 == 0:
                self.assertEqual(changed, 0)  # frozen since step 0
                self.assertTrue(torch.equal(after, expected(i, shape, "cpu", 0)))
            else:
                self.assertGreater(changed, 15)  # 20 positions; a new value may equal the old
                self.assertLessEqual(changed, 20)
            # A trainer applying step 2 to what it held at step 1 gets what the consumer wants.
            held = before.clone()
            if i % 10:
                sparse_step(held, i, 2)
            self.assertTrue(torch.equal(held.view(torch.int16), after.view(torch.int16)))


if __name__ == "__main__":
    unittest.main()
