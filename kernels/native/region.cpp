// A measured region for instruction counting (sparsekern/bench/instructions.py): callgrind collects only
// inside sk_region (--toggle-collect=sk_region), which calls back into Python, so a whole training step,
// dense or sparse, is counted and nothing of the interpreter's start-up is.
extern "C" __attribute__((noinline)) void sk_region(void (*fn)()) { fn(); }
