// Command kubectl-vmpod is the kubectl plugin for vmpod VMs (kubectl vmpod ...).
package main

import (
	"os"

	"github.com/vmpod/vmpod/controller/plugin"
)

func main() {
	os.Exit(plugin.Main(os.Args[1:], plugin.IO{In: os.Stdin, Out: os.Stdout, Err: os.Stderr}))
}
