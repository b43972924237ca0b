// vmpod-agent is PID 1 of a container pod's VM; see package agent.
package main

import "github.com/vmpod/vmpod/agent"

func main() { agent.Main() }
