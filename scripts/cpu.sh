# Sourced by the benchmark scripts: this machine's CPU model name ($CPU) and a file-name form of it ($SLUG),
# which names the docs/bench/*.md a script writes.
CPU=$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -1)
SLUG=$(echo "$CPU" | tr 'A-Z' 'a-z' | sed 's/([^)]*)//g; s/[^a-z0-9]\+/-/g; s/^-//; s/-$//')
