// A measured region for instruction counting (sparsekern/bench/instructions.py): sk_region zeroes
// callgrind's counters, calls back into Python (a whole training step, dense or sparse), then has
// callgrind write them out, so each step's count is its own and nothing of the interpreter's start-up
// counts. The requests are callgrind's client requests (valgrind/callgrind.h): a few no-op
// instructions outside valgrind. Without the header (no valgrind installed) sk_region only calls fn,
// and sk_region_counts() says so. (Matching the function by name, --toggle-collect=sk_region, counted
// nothing: callgrind did not resolve this library's symbols.)
#if __has_include(<valgrind/callgrind.h>)
#include <valgrind/callgrind.h>
#define SK_COUNTS 1
#else
#define SK_COUNTS 0
#endif

extern "C" {

int sk_region_counts() { return SK_COUNTS; }

void sk_region(void (*fn)()) {
#if SK_COUNTS
    // With --instr-atstart=no, valgrind runs everything outside the regions uninstrumented (several
    // times faster: torch's import is most of the run).
    CALLGRIND_START_INSTRUMENTATION;
    CALLGRIND_ZERO_STATS;
#endif
    fn();
#if SK_COUNTS
    CALLGRIND_DUMP_STATS;
    CALLGRIND_STOP_INSTRUMENTATION;
#endif
}

}  // extern "C"
