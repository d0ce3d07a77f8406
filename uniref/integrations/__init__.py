"""Bridges to other libraries; each module imports its library on use (none is needed by `import uniref`)."""
