// Command vmpod-importer fills a DataVolume's PVC; the DataVolume controller runs it in a Job.
package main

import (
	"os"

	"github.com/vmpod/vmpod/controller/importer"
)

func main() { os.Exit(importer.Main(os.Args[1:])) }
