# Worked example: a fleet of 2-6 appliances in two private subnets, forwarding the bookinfo
# services of examples/catalog.yaml, its identity issued by AWS Private CA, and the mesh names
# rewritten for the legacy VMs' VPC. Review with: terraform init && terraform plan

terraform {
  required_version = ">= 1.5.0"
  required_providers {
    aws = {
      source  = "hashicorp/aws"
      version = "~> 5.40"
    }
  }
}

provider "aws" {
  region = "eu-west-1"
}

variable "ami_id" {
  type        = string
  description = "AMI built by images/packer."
}

variable "acm_pca_arn" {
  type        = string
  description = "Private CA that issues the fleet's SPIFFE identity, chained to the mesh's root."
}

variable "gossip_keyring_secret_arn" {
  type        = string
  description = "Secrets Manager secret holding `fwdproxy keygen` output (the fleet's gossip keyring)."
}

module "fwdproxy" {
  source = "../.."

  name       = "fwdproxy"
  vpc_id     = "vpc-0a1b2c3d4e5f60708"
  subnet_ids = ["subnet-0a1b2c3d4e5f60001", "subnet-0a1b2c3d4e5f60002"]
  ami_id     = var.ami_id

  min_size = 2
  max_size = 6

  # The catalog's ports: one NLB listener and target group each.
  listener_ports = [
    { port = 9080, protocol = "http" },
    { port = 50051, protocol = "grpc" },
    { port = 3306, protocol = "tcp" },
  ]
  client_cidrs     = ["10.0.0.0/8"]
  monitoring_cidrs = ["10.50.0.0/24"]

  acm_pca_arn               = var.acm_pca_arn
  gossip_keyring_secret_arn = var.gossip_keyring_secret_arn
  fwdproxy_config = {
    mesh = { trustDomain = "cluster.local" }
    gateways = [
      { name = "eastwest-a", address = "10.20.0.10", port = 15443, network = "network1" },
    ]
    identity = {
      spiffeID = "spiffe://cluster.local/ns/fwdproxy/sa/fwdproxy"
      acmpca   = { certificateAuthorityArn = var.acm_pca_arn }
    }
  }
  catalog_yaml = file("${path.module}/../../../../examples/catalog.yaml")

  # Legacy VMs in vpc-0f0e0d0c0b0a09080 resolve *.bookinfo.svc.cluster.local and the legacy
  # alias productpage.example.internal to the NLB.
  dns_zones = {
    "bookinfo.svc.cluster.local" = {}
    "example.internal"           = { names = ["productpage", "reviews-v2"] }
  }
  dns_vpc_ids = ["vpc-0f0e0d0c0b0a09080"]

  tags = { team = "platform" }
}

output "nlb_dns_name" {
  description = "The NLB the mesh names resolve to."
  value       = module.fwdproxy.nlb_dns_name
}

output "dns_records" {
  description = "Names rewritten to the NLB."
  value       = module.fwdproxy.dns_records
}
