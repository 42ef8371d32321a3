// A measured region for instruction counting (sparsekern/bench/instructions.py): callgrind collects only
// inside sk_region (--toggle-collect=sk_region), which calls back into Python, so a whole training step,
// dense or sparse, is counted and nothing of the interpreter's start-up is. The call must stay a call:
// compiled as a tail jump, callgrind sees sk_region return before the step runs and counts nothing.
extern "C" __attribute__((noinline, optimize("no-optimize-sibling-calls"))) void sk_region(void (*fn)()) {
    fn();
    asm volatile("" ::: "memory");
}
