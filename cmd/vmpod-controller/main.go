// Command vmpod-controller runs the VirtualMachine and DataVolume controllers.
package main

import (
	"os"

	"github.com/vmpod/vmpod/controller/manager"
)

func main() { os.Exit(manager.Main(os.Args[1:])) }
