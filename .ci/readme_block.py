"""Print the N-th fenced code block of a README section, so CI runs what the README says."""

import re
import sys


def block(path: str, section: str, index: int) -> str:
    text = open(path, encoding="utf-8").read()
    head = re.search(rf"^#+ .*{re.escape(section)}.*$", text, re.IGNORECASE | re.MULTILINE)
    if head is None:
        raise SystemExit(f"{path}: no section titled {section!r}")
    rest = text[head.end() :]
    following = re.search(r"^#+ ", rest, re.MULTILINE)
    body = rest[: following.start()] if following else rest
    blocks = re.findall(r"^```[^\n]*\n(.*?)^```", body, re.MULTILINE | re.DOTALL)
    if len(blocks) < index:
        raise SystemExit(
            f"{path}: section {section!r} has {len(blocks)} code blocks, wanted #{index}"
        )
    return blocks[index - 1].strip()


if __name__ == "__main__":
    print(block(sys.argv[1], sys.argv[2], int(sys.argv[3])))
