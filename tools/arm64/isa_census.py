"""Which kinds of aarch64 instructions a program ran, from QEMU's `-d in_asm` log: the evidence for which
onnxruntime (MLAS) kernels it chose on an emulated CPU.

    python3 isa_census.py QEMU_IN_ASM.log        prints {"int8 dot product (SDOT/UDOT)": 64, ...} as JSON

QEMU translates each block of guest code once, when it first runs, and `-d in_asm` logs it: a count here is the
number of distinct instructions of that kind that ran at least once, not how often they ran (counting
executions is the job of a TCG plugin). Classes are recognised by their encoding, because the disassembler
Debian's QEMU 7.2 uses (capstone 4) prints ARMv8.2+ instructions such as UDOT as `.byte`.
"""

from __future__ import annotations

import json
import re
import sys
from collections import Counter

# (name, mask, value) over the 32-bit instruction word; see the Arm ARM's A64 encoding index.
ENCODINGS = (
    # SDOT/UDOT (vector) and (by element): ARMv8.2 dot product, the int8 GEMM kernels' inner loop.
    ("int8 dot product (SDOT/UDOT)", 0x9FE0FC00, 0x0E809400),
    ("int8 dot product (SDOT/UDOT)", 0x9FC0F400, 0x0F80E000),
    # SMMLA/UMMLA/USMMLA: ARMv8.6 int8 matrix multiply (i8mm); neither Pi has it.
    ("int8 matrix multiply (SMMLA/UMMLA)", 0xDFE0F400, 0x4E80A400),
    # Advanced SIMD three-same FP16 (FMLA/FADD/FMUL/... on .4h/.8h): ARMv8.2 half-precision arithmetic.
    ("fp16 vector arithmetic", 0x9F20C400, 0x0E400400),
)
# Plain NEON instructions that capstone 4 names: the int8 kernels without dot product widen and multiply.
MNEMONICS = {
    "umull": "int8 widening multiply (UMULL/SMULL/UMLAL/SMLAL)",
    "umull2": "int8 widening multiply (UMULL/SMULL/UMLAL/SMLAL)",
    "smull": "int8 widening multiply (UMULL/SMULL/UMLAL/SMLAL)",
    "smull2": "int8 widening multiply (UMULL/SMULL/UMLAL/SMLAL)",
    "umlal": "int8 widening multiply (UMULL/SMULL/UMLAL/SMLAL)",
    "umlal2": "int8 widening multiply (UMULL/SMULL/UMLAL/SMLAL)",
    "smlal": "int8 widening multiply (UMULL/SMULL/UMLAL/SMLAL)",
    "smlal2": "int8 widening multiply (UMULL/SMULL/UMLAL/SMLAL)",
    "fmla": "fp32/fp64 fused multiply-add (FMLA)",
}
LINE = re.compile(r"^0x[0-9a-f]+:\s+([0-9a-f]{8})\s+(\S+)")


def census(lines) -> dict[str, int]:
    counts: Counter[str] = Counter()
    for line in lines:
        match = LINE.match(line)
        if not match:
            continue
        word, mnemonic = int(match.group(1), 16), match.group(2)
        counts["instructions"] += 1
        for name, mask, value in ENCODINGS:
            if word & mask == value:
                counts[name] += 1
                break
        else:
            if mnemonic in MNEMONICS:
                counts[MNEMONICS[mnemonic]] += 1
    return dict(counts)


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    with open(argv[1], encoding="utf-8", errors="replace") as fh:
        print(json.dumps(census(fh), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
