"""StackExchange bodies are HTML: their text, block by block, as the loader trains on it."""

from html.parser import HTMLParser


class _HtmlBlocks(HTMLParser):
    """Text of each top-level HTML block; <pre>/<code> blocks are kept as <code>...</code>
    (they hold real code, as in the reference). Unlike the reference, text inside inline tags
    (<a>, <em>, ...) and lists is kept instead of silently dropped."""
    VOID = {"br", "hr", "img", "input", "meta", "link", "wbr"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.blocks, self.depth, self.current, self.is_code = [], 0, None, False

    def handle_starttag(self, tag, attrs):
        if tag in self.VOID:
            if tag == "br" and self.current is not None:
                self.current.append("\n")
            return
        if self.depth == 0:
            self.current, self.is_code = [], tag in ("pre", "code")
        self.depth += 1

    def handle_endtag(self, tag):
        if tag in self.VOID or self.depth == 0:
            return
        self.depth -= 1
        if self.depth == 0:
            self._flush()

    def handle_data(self, data):
        if self.depth == 0:
            if data.strip():
                self.blocks.append(data.strip())
        else:
            self.current.append(data)

    def _flush(self):
        text = "".join(self.current)
        text = f"<code>{text}</code>" if self.is_code else text.strip()
        if text.strip():
            self.blocks.append(text)
        self.current = None


def strip_html(html: str) -> str:
    parser = _HtmlBlocks()
    parser.feed(html)
    parser.close()
    if parser.current is not None:  # unclosed top-level tag
        parser._flush()
    return "\n\n".join(parser.blocks)
